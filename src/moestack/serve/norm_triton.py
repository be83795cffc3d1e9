"""The residual add and the RMSNorm after it as one Triton kernel (serving on CUDA).

Each block of the serving model adds a sublayer's output to the residual stream and norms the sum for the
next sublayer: eagerly an add and `F.rms_norm`, two kernels (1.4 + 3.7 us at batch 8, OLMoE's shapes, H100,
`bash bench/suite.sh profile_decode`, 2026-12-07), twice per layer. Here one program per token row adds in
fp32, rounds the sum to the stream's dtype (what the eager add stores), and norms that rounded sum in fp32 as
`F.rms_norm` does: it returns both, equal to the eager pair up to the norm's last rounding. Without an addend
it is the norm alone (a block's first norm, 3.9 us as `F.rms_norm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(h_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, D, eps, stride_h, stride_y, stride_ys,
                  BLOCK_D: tl.constexpr, ADD: tl.constexpr, S: tl.constexpr = 1):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    s = tl.load(h_ptr + t * stride_h + d, mask=m, other=0.0)
    if ADD:  # the addend: the sum of S rows, in fp32, rounded to the stream's dtype as its producer stores it
        y = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(S):
            y += tl.load(y_ptr + t * stride_y + j * stride_ys + d, mask=m, other=0.0).to(tl.float32)
        s = (s.to(tl.float32) + y.to(s.dtype).to(tl.float32)).to(s.dtype)
        tl.store(sum_ptr + t * D + d, s, mask=m)
    x = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, (x * r * w).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + y, rms_norm(h + y) * weight) for rows h, y [T, D] of one dtype; (h, rms_norm(h) * weight) for y None.
    y may be a stack [T, S, D] of rows to sum first (`serve.model.addend`: the MoE's weighted choices, a split-K GEMM's fp32
    partial products), in fp32, rounded to h's dtype: their own sum kernel and its launch saved."""
    stack = y is not None and y.dim() == 3
    if h.dim() != 2 or (y is not None and (y.shape[::2 if stack else 1] != h.shape
                                           or (h.dtype != y.dtype and not stack))):
        got = "None" if y is None else f"{tuple(y.shape)} {y.dtype}"
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)} {h.dtype} and y {got} must be [T, D] of one shape and "
                         "dtype, or y a stack [T, S, D] of rows to sum")
    T, D = h.shape
    add = y is not None
    h = h if h.stride(1) == 1 else h.contiguous()
    y = h if not add else y if y.stride(-1) == 1 else y.contiguous()
    total = torch.empty_like(h, memory_format=torch.contiguous_format) if add else h
    out = torch.empty(T, D, dtype=h.dtype, device=h.device)
    if T:
        _add_rms_norm[(T,)](h, y, weight, total, out, D, float(eps), h.stride(0), y.stride(0),
                            y.stride(1) if stack else 0, BLOCK_D=triton.next_power_of_2(D),
                            num_warps=8 if D > 2048 else 4, ADD=add, S=y.shape[1] if stack else 1)
    return total, out

