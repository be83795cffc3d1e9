"""The router's softmax, top-k, weights and expert counts as one Triton kernel (inference).

`Router.forward` eagerly is softmax, `topk` (on CUDA a radix select and a bitonic sort), a gather, the
renormalisation and a scatter-add of the counts: 15 us per layer of a batch-8 decode step at OLMoE's shapes
on an H100 (`bash bench/suite.sh profile_decode`, 2026-12-07), the routers compiled. Here one program per token
loads its E logits (any float dtype; fp32 math), takes the softmax, picks the k largest probabilities (plus the
balancing bias, for selection only) by k rounds of max (the lowest expert id among equals), writes ids and
weights in descending order, and adds its choices to the counts with atomics (integer adds: exact, any order).
Decode batches (`topk_plan`): one program takes every token at once, and also writes the fused MoE's plan of
the choices (`fused_triton.plan_blocks`).
Notation: T = tokens, E = experts, k = choices per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moestack.moe.fused_triton import plan_blocks


@triton.jit
def _topk_softmax(logits_ptr, bias_ptr, ids_ptr, w_ptr, counts_ptr, E, stride_t,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORM: tl.constexpr,
                  BIAS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    logit = tl.load(logits_ptr + t * stride_t + e, mask=em, other=float("-inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, axis=0))
    p = p / tl.sum(p, axis=0)
    select = p
    if BIAS:
        select = p + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    select = tl.where(em, select, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    ws = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(select, axis=0)
        idx = tl.minimum(tl.min(tl.where(select == best, e, BLOCK_E), axis=0), E - 1)  # NaN rows: still an expert
        ids = tl.where(kk == j, idx, ids)
        ws = tl.where(kk == j, tl.sum(tl.where(e == idx, p, 0.0), axis=0), ws)
        select = tl.where(e == idx, float("-inf"), select)
    if RENORM:
        ws = ws / tl.sum(ws, axis=0)
    km = kk < K
    tl.store(ids_ptr + t * K + kk, ids.to(tl.int64), mask=km)
    tl.store(w_ptr + t * K + kk, ws, mask=km)
    tl.atomic_add(counts_ptr + ids, tl.full([BLOCK_K], 1, tl.int64), mask=km & (ids < E))


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (expert ids [T, k] int64, weights [T, k] fp32, counts [E] int64), as `Router.forward`
    computes them: softmax in fp32, top-k of the probabilities (+ bias), weights renormalised to sum 1 when
    `renormalize`."""
    T, E = logits.shape
    logits = logits.contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    if T:
        _topk_softmax[(T,)](logits, bias if bias is not None else logits, ids, weights, counts, E, logits.stride(0),
                            K=k, BLOCK_E=triton.next_power_of_2(E), BLOCK_K=max(2, triton.next_power_of_2(k)),
                            RENORM=renormalize, BIAS=bias is not None)
    return ids, weights, counts


@triton.jit
def _topk_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr,
               T, E, stride_t, cap, num_blocks, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_K: tl.constexpr, RENORM: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               FILL: tl.constexpr, CH: tl.constexpr):
    t = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    tm = t < T
    em = e < E
    m2 = tm[:, None] & em[None, :]
    logit = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_t + e[None, :], mask=m2,
                    other=float("-inf")).to(tl.float32)
    logit = tl.where(tm[:, None], logit, 0.0)  # rows past T: finite, never stored
    p = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    select = p
    if BIAS:
        select = p + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)[None, :]
    select = tl.where(em[None, :], select, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    ws = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    choice = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)  # which choice of its token picked expert e (-1: none)
    for j in tl.static_range(K):
        best = tl.max(select, axis=1)
        # the lowest untaken expert among the best; a row without one (NaN scores) takes its lowest untaken
        # expert, so a token's k choices are k distinct experts and each gets its own row in the plan
        free = em[None, :] & (choice < 0)
        top = tl.min(tl.where(free & (select == best[:, None]), e[None, :], BLOCK_E), axis=1)
        idx = tl.where(top < BLOCK_E, top, tl.min(tl.where(free, e[None, :], BLOCK_E), axis=1))  # [T]
        hit = e[None, :] == idx[:, None]
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        ws = tl.where(kk[None, :] == j, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], ws)
        choice = tl.where(hit, j, choice)
        select = tl.where(hit, float("-inf"), select)
    if RENORM:
        ws = ws / tl.sum(ws, axis=1)[:, None]
    km = tm[:, None] & (kk < K)[None, :]
    out = t[:, None] * K + kk[None, :]
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=km)
    tl.store(w_ptr + out, ws, mask=km)
    # the plan: entries t * K + j sorted by expert (token order within one), each expert padded to BLOCK_M rows
    sel = ((choice >= 0) & tm[:, None]).to(tl.int32)  # [T, E]
    before = tl.cumsum(sel, axis=0) - sel  # an entry's rank among its expert's entries
    counts = tl.sum(sel, axis=0)
    tl.store(counts_ptr + e, counts.to(tl.int64), mask=em)
    starts = plan_blocks(counts, em, sorted_ptr, block_expert_ptr, total_ptr, T * K, E, cap, num_blocks,
                         BLOCK_M=BLOCK_M, FILL=FILL, CH=CH)
    tl.store(sorted_ptr + starts[None, :] + before, t[:, None] * K + choice, mask=sel > 0)


PLAN_MAX_CELLS = 1 << 13  # tokens x experts up to which `topk_plan` runs (one program holds them all)
PLAN_MAX_TOKENS = 64  # and tokens: decode batches


def topk_plan(logits: torch.Tensor, k: int, renormalize: bool, bias: torch.Tensor | None, block_m: int, cap: int):
    """`topk_softmax` and the fused MoE's plan for its choices (what `fused.align` gives for the ids) in one
    single-program kernel, for decode-sized batches (T x E up to PLAN_MAX_CELLS): (ids, weights, counts,
    (sorted entry ids [cap] int32, block experts [cap // block_m] int32, padded total [1] int32)).
    In a batch-8 decode step the router's top-k (4.7 us), the zeroing of its counts and the plan's kernel
    (5.5 us) ran one after another at Qwen3-30B-A3B's shapes on an H100 (profile_decode, 2026-12-07).
    The gate stays cuBLAS: as Triton partial products summed by this kernel it was slower at 128 experts (14.6
    against 11.1 us for gate + top-k + plan in bench/decode_pieces.py; 19 us in the step, 2026-12-07 14:35 UTC)."""
    T, E = logits.shape
    if not plan_fits(T, E):
        raise ValueError(f"topk_plan: {T} tokens x {E} experts is past one program ({PLAN_MAX_CELLS} cells, "
                         f"{PLAN_MAX_TOKENS} tokens); use topk_softmax and fused.align")
    logits, dev = logits.contiguous(), logits.device
    ids = torch.empty(T, k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(E)
    _topk_plan[(1,)](logits, bias if bias is not None else logits, ids, weights, counts, sorted_ids, block_expert,
                     total, T, E, logits.stride(0), cap, cap // block_m, K=k, BLOCK_T=max(2, triton.next_power_of_2(T)),
                     BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(k)), RENORM=renormalize,
                     BIAS=bias is not None, BLOCK_M=block_m, FILL=1024, CH=max(16, 4096 // block_e), num_warps=4)
    return ids, weights, counts, (sorted_ids, block_expert, total)


def plan_fits(tokens: int, experts: int) -> bool:
    """Whether `topk_plan`'s one program holds a batch of this size (decode batches)."""
    return tokens <= PLAN_MAX_TOKENS and tokens * triton.next_power_of_2(experts) <= PLAN_MAX_CELLS
