"""Paged attention as Triton kernels: decode (one new token per sequence) and prefill (any new tokens).

`paged_decode`: each program is one (sequence, KV head) pair, or with split-KV one run of its keys.

The program loads its G = H / Hkv query heads once, walks the sequence's keys BLOCK_N positions at a time
through the block table (any block size: each of the BLOCK_N positions looks up its own block), and keeps an online
softmax (running max and sum) in fp32, as FlashAttention does; the key count comes from the device, so a
CUDA graph captured once serves every context length. Eager reference: `attention.attend_ref`.
`paged_prefill`: each program is one (block of a sequence's new tokens, KV head) pair, its rows the block's
tokens times the KV head's G query heads; it walks the sequence's keys up to the block's last position,
causal by position, so fresh prompts, chunked prefills, prefix-cached prompts and decodes mixed into the
same step all take it. The step's new keys are in the cache already (`attention.write_kv` runs first), and
which program takes which tokens (`attention.query_blocks`) comes from the device: CUDA graphs capture a whole step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moestack.moe.fused_triton import precision


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr, scale,
                  stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ob, stride_oh,
                  G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_keys = tl.load(lens_ptr + b)
    span = tl.cdiv(tl.cdiv(n_keys, SPLITS), BLOCK_N) * BLOCK_N  # keys per split, whole tiles
    lo = split * span
    hi = tl.minimum(lo + span, n_keys)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < HD
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pm = pos < hi
        page = tl.load(bt_ptr + b * stride_bt + pos // PAGE, mask=pm, other=0).to(tl.int64)
        rows = page * stride_kb + (pos % PAGE) * stride_ks + kvh * stride_kh  # [BLOCK_N]
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(pm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    else:  # this split's running max, sum and unnormalised output per head: [B, H, SPLITS, 2 + BLOCK_D] fp32
        H = tl.num_programs(1) * G
        row = part_ptr + ((b * H + heads) * SPLITS + split) * (2 + BLOCK_D)  # [BLOCK_G]
        tl.store(row, m_i, mask=gm)
        tl.store(row + 1, l_i, mask=gm)
        tl.store(row[:, None] + 2 + d[None, :], acc, mask=gm[:, None])


@triton.jit
def _paged_decode_combine(part_ptr, out_ptr, stride_ob, stride_oh, H, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                          SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    rows = part_ptr + ((b * H + h) * SPLITS + sp) * (2 + BLOCK_D)  # [SPLITS]
    m = tl.load(rows)  # an empty split: -inf, sum 0, output 0
    l = tl.load(rows + 1)
    acc = tl.load(rows[:, None] + 2 + d[None, :])  # [SPLITS, BLOCK_D]
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HD)


def decode_tiles(batch: int, kv_heads: int, sms: int = 132) -> tuple[int, int]:
    """(key splits, keys per tile) of a decode step's `paged_decode`. Up to half as many (sequence, KV head)
    pairs as SMs: enough splits for a program on every SM (at most 8), tiles of 64. Up to one pair per SM: no
    split, tiles of 128 (at OLMoE's batch 8, 128 pairs, 6.7 us against 7.9 with two splits of 64-key tiles and
    7.6 with one, on an H100: bench/decode_pieces.py, 2026-12-07 14:34 UTC). More pairs: tiles of 64, as measured
    in the batch-64 rows of docs/BENCHMARKS.md."""
    pairs = max(batch * kv_heads, 1)
    if 2 * pairs <= sms:
        return min(8, triton.next_power_of_2(triton.cdiv(sms, pairs))), 64
    return 1, 128 if pairs <= sms else 64


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_n: int = 64, splits: int = 1) -> torch.Tensor:
    """q [B, H, hd]; k/v cache [blocks, page, Hkv, hd]; block_tables [B, max_blocks]; context_lens [B] -> [B, H, hd].
    block_n: keys per step of a program's walk (bench/decode_pieces.py compares tiles). splits (a power of two):
    each (sequence, KV head) walks its keys in that many programs at once, each over a run of whole tiles, and a
    second kernel merges their softmax sums (split-KV, as flash-decoding does): a batch-8 step has few pairs to
    spread over the GPU's SMs, so one program would walk all its keys alone."""
    B, H, hd = q.shape
    _, page, Hkv, _ = k_cache.shape
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_decode needs contiguous head rows and one layout for keys and values")
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"paged_decode: splits must be a power of two >= 1, got {splits}")
    q = q.contiguous().to(k_cache.dtype)
    out = torch.empty_like(q)
    G = H // Hkv
    block_d = max(16, triton.next_power_of_2(hd))
    part = out if splits == 1 else torch.empty(B * H * splits * (2 + block_d), dtype=torch.float32, device=q.device)
    _paged_decode[(B, Hkv, splits)](q, k_cache, v_cache, block_tables, context_lens, out, part, hd ** -0.5,
                                    q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                    block_tables.stride(0), out.stride(0), out.stride(1),
                                    G=G, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d,
                                    BLOCK_N=block_n, PAGE=page, PREC=precision(q), SPLITS=splits)
    if splits > 1:
        _paged_decode_combine[(B, H)](part, out, out.stride(0), out.stride(1), H, HD=hd, BLOCK_D=block_d, SPLITS=splits)
    return out


@triton.jit
def _paged_prefill(q_ptr, k_ptr, v_ptr, bt_ptr, qstart_ptr, ctx_ptr, bseq_ptr, bfirst_ptr, out_ptr, scale,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                   G: tl.constexpr, HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr):
    b = tl.load(bseq_ptr + tl.program_id(0)).to(tl.int64)
    if b >= 0:
        kvh = tl.program_id(1).to(tl.int64)
        first = tl.load(bfirst_ptr + tl.program_id(0)).to(tl.int64)
        q_end = tl.load(qstart_ptr + b + 1).to(tl.int64)
        n_keys = tl.load(ctx_ptr + b).to(tl.int64)
        r = tl.arange(0, BLOCK_Q * BLOCK_G)  # row r: query token first + r // BLOCK_G, head kvh * G + r % BLOCK_G
        t = first + r // BLOCK_G
        g = r % BLOCK_G
        rm = (t < q_end) & (g < G)
        qpos = tl.where(rm, n_keys - (q_end - t), 0)  # the query's position in its sequence; rows not used see key 0
        d = tl.arange(0, BLOCK_D)
        dm = d < HD
        heads = kvh * G + g
        q = tl.load(q_ptr + t[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=rm[:, None] & dm[None, :], other=0.0)  # [BLOCK_Q * BLOCK_G, BLOCK_D]
        m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
        last = n_keys - 1 - (q_end - tl.minimum(first + BLOCK_Q, q_end))  # the block's last query position
        for start in range(0, last + 1, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pm = pos <= last
            page = tl.load(bt_ptr + b * stride_bt + pos // PAGE, mask=pm, other=0).to(tl.int64)
            rows = page * stride_kb + (pos % PAGE) * stride_ks + kvh * stride_kh  # [BLOCK_N]
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
            s = tl.where(pos[None, :] <= qpos[:, None], s, float("-inf"))  # causal by position
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  q_start: torch.Tensor, context_lens: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor],
                  block_q: int) -> torch.Tensor:
    """Causal attention of a step's new tokens over the paged cache, which already holds their keys and values.

    q [T, H, hd]: sequence b's queries are rows q_start[b]:q_start[b + 1], its last keys: its positions run up
    to context_lens[b] - 1; block_tables [B, max_blocks]; blocks = `attention.query_blocks(q_start, block_q, ...)`
    with block_q = `attention.prefill_block_q(H, Hkv)`. Rows of q in no sequence (padding of a captured step)
    give zeros. -> [T, H, hd]
    """
    T, H, hd = q.shape
    _, page, Hkv, _ = k_cache.shape
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_prefill needs contiguous head rows and one layout for keys and values")
    q = q.contiguous().to(k_cache.dtype)
    out = torch.zeros_like(q)
    G = H // Hkv
    block_g = triton.next_power_of_2(G)
    seq, first = blocks
    _paged_prefill[(seq.numel(), Hkv)](q, k_cache, v_cache, block_tables, q_start, context_lens, seq, first, out,
                                       hd ** -0.5, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                                       k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
                                       G=G, HD=hd, BLOCK_Q=block_q, BLOCK_G=block_g,
                                       BLOCK_D=max(16, triton.next_power_of_2(hd)), BLOCK_N=64 if q.is_cuda else 16,
                                       PAGE=page, PREC=precision(q))
    return out
