"""Greedy sampling's argmax over the vocabulary as two Triton kernels (serving on CUDA).

At batch 8 `torch.argmax` over fp32 logits [8, V] runs few thread blocks per row: 10.4 us at Qwen3's
151936-word vocabulary on an H100, plus 5.7 us for the bf16 -> fp32 copy of the logits before it (`bash
bench/suite.sh profile_decode`, 2026-12-07), where reading the logits once takes about 1 us. Here the first
kernel splits each row into chunks over many programs (each chunk's maximum and its first index), the second
picks each row's best chunk; both read any float dtype in place, so the decode graph takes the argmax of the
LM head's bf16 output and the fp32 copy is made only for rows that sample otherwise. Ties give the lowest
index and NaN counts as the largest value, as `torch.argmax` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_max(x_ptr, val_ptr, idx_ptr, V, stride_r, CHUNKS, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * stride_r + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN: the largest (its first index wins below)
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(x == best, cols, V), axis=0)
    tl.store(val_ptr + r * CHUNKS + c, best)
    tl.store(idx_ptr + r * CHUNKS + c, first)


@triton.jit
def _row_max(val_ptr, idx_ptr, out_ptr, CHUNKS, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    m = c < CHUNKS
    v = tl.load(val_ptr + r * CHUNKS + c, mask=m, other=float("-inf"))
    i = tl.load(idx_ptr + r * CHUNKS + c, mask=m, other=2**31 - 1)
    best = tl.max(v, axis=0)
    tl.store(out_ptr + r, tl.min(tl.where(v == best, i, 2**31 - 1), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Index of each row's largest value: x [N, V] (any float dtype) -> [N] int64, as `x.argmax(-1)`."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"argmax_rows: expected float rows [N, V], got {tuple(x.shape)} {x.dtype}")
    N, V = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    block = min(block, triton.next_power_of_2(max(V, 1)))
    chunks = triton.cdiv(V, block)
    vals = torch.empty(N, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(N, chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(N, dtype=torch.int64, device=x.device)
    if N and V:
        _chunk_max[(N, chunks)](x, vals, idx, V, x.stride(0), chunks, BLOCK=block, num_warps=8)
        _row_max[(N,)](vals, idx, out, chunks, BLOCK_C=max(2, triton.next_power_of_2(chunks)))
    return out
