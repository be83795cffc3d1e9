"""The router's softmax, top-k, weights and expert counts as one Triton kernel (inference).

`Router.forward` eagerly is softmax, `topk` (on CUDA a radix select and a bitonic sort), a gather, the
renormalisation and a scatter-add of the counts: 15 us per layer of a batch-8 decode step at OLMoE's shapes
on an H100 (`bash bench/suite.sh profile_decode`, 2026-12-07), the routers compiled. Here one program per token
loads its E logits (any float dtype; fp32 math), takes the softmax, picks the k largest probabilities (plus the
balancing bias, for selection only) by k rounds of max (the lowest expert id among equals), writes ids and
weights in descending order, and adds its choices to the counts with atomics (integer adds: exact, any order).
Notation: T = tokens, E = experts, k = choices per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
