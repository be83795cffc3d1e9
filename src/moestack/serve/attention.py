"""Attention over the paged KV cache: write the new keys/values into their slots, then attend.

Two paths read the same cache:
- `attend_ref` (any batch: prefill chunks, decodes, prefix-cached prompts; CPU and GPU): gathers each
  sequence's keys and values from its blocks into a padded [B, L, Hkv, hd] tensor and runs
  `F.scaled_dot_product_attention` with a causal-by-position mask. The readable reference.
- `attend_fresh` (every sequence of the step starts at position 0: a batch of new prompts): pads the step's
  own queries, keys and values to [B, Q] and runs causal SDPA (flash attention on the GPU); nothing is read
  back from the cache. Padding sits after each sequence's tokens, so the causal mask hides it.
- `attend_decode` (one new token per sequence; CUDA graphs): `attention_triton.paged_decode` reads the
  blocks in place through the block table, never materialising a copy; lengths come from the device.
- `attend_prefill` (any step, on the GPU; CUDA graphs): `attention_triton.paged_prefill`, causal by position
  over the blocks in place; where each sequence's new tokens are and how long it is come from the device.
The cache of one layer is k, v: [num_blocks + 1, block_size, Hkv, hd]; the last block is a scratch block
that padding rows of a captured batch write into and read from.
Notation: T = new tokens in the step, B = sequences, H / Hkv = query / key-value heads, hd = head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moestack.moe.experts import sm_count


@dataclass
class AttnMeta:
    """Where a step's new tokens go in the cache and what each attends to."""

    slots: torch.Tensor  # [T] int64 cache slot (block * block_size + offset) of each new token
    # reference path
    q_seq: torch.Tensor | None = None  # [T] sequence of each new token
    q_row: torch.Tensor | None = None  # [T] its row among its sequence's new tokens
    key_slots: torch.Tensor | None = None  # [B, L] cache slot of each key position (padding: slot 0)
    mask: torch.Tensor | None = None  # [B, 1, Q, L] bool: query row may attend to key position
    fresh: bool = False  # every sequence starts at position 0 (attend_fresh; key_slots and mask unused)
    batch: int = 0  # B and Q of the padded layout (fresh path)
    max_q: int = 0
    # decode path
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32 keys per sequence, the new one included
    valid: torch.Tensor | None = None  # [T] 1 for real tokens, 0 for padding rows of a captured batch
    # prefill kernel (block_tables and context_lens as above)
    q_start: torch.Tensor | None = None  # [B + 1] int32: sequence b's new tokens are rows q_start[b]:q_start[b + 1]
    q_blocks: tuple | None = None  # query_blocks(q_start, prefill_block_q(H, Hkv), ...): the kernel's programs

    @property
    def decode(self) -> bool:
        return self.block_tables is not None and self.q_start is None

    @property
    def prefill(self) -> bool:
        return self.q_start is not None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """Store the new keys/values k, v [T, Hkv, hd] at their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def attend_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, hd] -> [T, H, hd]: SDPA over each sequence's cached keys, masked by position. rows: which of the
    step's tokens q holds (None: all of them; the token-follows-expert flow attends a rank's share)."""
    B, Q = meta.mask.shape[0], meta.mask.shape[2]
    T, H, hd = q.shape
    q_seq, q_row = _query_rows(meta, rows)
    q_pad = q.new_zeros(B, Q, H, hd)
    q_pad[q_seq, q_row] = q
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [slots, Hkv, hd]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    k = flat_k[meta.key_slots].to(q.dtype)  # [B, L, Hkv, hd]
    v = flat_v[meta.key_slots].to(q.dtype)
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=meta.mask, enable_gqa=k.shape[2] != H)  # [B, H, Q, hd]
    return out.transpose(1, 2)[q_seq, q_row]


def attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, hd], k/v [T, Hkv, hd] of sequences that start at position 0 -> causal SDPA [T, H, hd]. rows: as in
    `attend_ref` (q holds those tokens only; k and v hold every token of the step)."""
    B, Q = meta.batch, meta.max_q
    pads = []
    for t, (seq, row) in ((q, _query_rows(meta, rows)), (k, (meta.q_seq, meta.q_row)), (v, (meta.q_seq, meta.q_row))):
        pad = t.new_zeros(B, Q, *t.shape[1:])
        pad[seq, row] = t
        pads.append(pad.transpose(1, 2))
    out = F.scaled_dot_product_attention(*pads, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])  # [B, H, Q, hd]
    return out.transpose(1, 2)[_query_rows(meta, rows)]


def _query_rows(meta: AttnMeta, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, row among its new tokens) of the queries `rows` of the step's tokens (None: all)."""
    if rows is None:
        return meta.q_seq, meta.q_row
    return meta.q_seq[rows], meta.q_row[rows]


def attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, hd] (one new token per sequence) -> [B, H, hd] through the Triton paged kernel (rows: which
    sequences q holds, None: all)."""
    from moestack.serve.attention_triton import decode_tiles, paged_decode

    tables, lens = (meta.block_tables, meta.context_lens) if rows is None else (meta.block_tables[rows], meta.context_lens[rows])
    splits, block_n = decode_tiles(q.shape[0], k_cache.shape[2], sm_count(q))
    return paged_decode(q, k_cache, v_cache, tables, lens, block_n=block_n, splits=splits)


def prefill_block_q(n_heads: int, n_kv_heads: int) -> int:
    """Query tokens per program of the prefill kernel: its rows are tokens x the G = H / Hkv heads of one KV head
    (G padded to a power of two), 64 rows in all where G <= 64."""
    group = 1 << max(0, (n_heads // n_kv_heads - 1).bit_length())
    return max(1, 64 // group)


def query_blocks(q_start: torch.Tensor, block_q: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill kernel's programs: (sequence [num_blocks] int32, -1 for none; its first token [num_blocks]).

    q_start [B + 1] int32: sequence b's new tokens are rows q_start[b]:q_start[b + 1] of the step (sequences
    without new tokens get no program). num_blocks >= ceil(T / block_q) + B covers any split. Device ops only,
    so a CUDA graph captured once maps every batch."""
    qlen = (q_start[1:] - q_start[:-1]).long()
    per_seq = (qlen + block_q - 1) // block_q  # [B]
    ends = torch.cumsum(per_seq, 0)
    m = torch.arange(num_blocks, device=q_start.device)
    b = torch.searchsorted(ends, m, right=True)  # [num_blocks]
    bc = b.clamp(max=qlen.numel() - 1)
    first = q_start[bc].long() + (m - (ends[bc] - per_seq[bc])) * block_q
    return torch.where(b < qlen.numel(), bc, -1).to(torch.int32), first.to(torch.int32)


def attend_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, hd] (the step's new tokens, any number per sequence) -> [T, H, hd] through the Triton paged prefill
    kernel; rows of q in no sequence (padding of a captured step) give zeros."""
    from moestack.serve.attention_triton import paged_prefill

    if rows is not None:
        raise ValueError("the paged prefill kernel attends every new token of the step; the token-follows-expert "
                         "flow builds reference metadata (AttnMeta without q_start)")
    return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.context_lens, meta.q_blocks,
                         prefill_block_q(q.shape[1], k_cache.shape[2]))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv, meta: AttnMeta,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the queries q over the cache kv (k_cache, v_cache) that already holds the step's keys k and
    values v: the decode or prefill kernel, the fresh-prompt path or the reference, as `meta` says."""
    if meta.prefill:
        return attend_prefill(q, *kv, meta, rows)
    if meta.decode:
        return attend_decode(q, *kv, meta, rows)
    if meta.fresh:
        return attend_fresh(q, k, v, meta, rows)
    return attend_ref(q, *kv, meta, rows)


def attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
    """No cache (calibration, whole sequences): q [B*S, H, hd], k/v [B*S, Hkv, hd] -> causal SDPA [B*S, H, hd]."""
    T, H, hd = q.shape
    S = T // batch
    qb, kb, vb = (t.view(batch, S, t.shape[1], hd).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=kb.shape[1] != H)
    return out.transpose(1, 2).reshape(T, H, hd)
