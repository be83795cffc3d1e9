"""Token rows into expert-ordered slots and weighted outputs back home, as Triton kernels (CUDA inference).

DualSparse (inference/dropping.py) uses both with P padded segments; the plain local dispatcher uses the
combine with one (P = 1). Callers pick them through `experts.fused_inference`.

Eager PyTorch fills the P segments with one gather over all P * R rows (padding included) and brings the
outputs home with P gathers of R rows, a select per segment and a weighted sum: several passes over
[R, D] tensors. These kernels touch only the rows that exist: `to_segments` copies each choice's token
row to its slot once, and `combine_segments` reads each choice's output row once from its segment and
writes each token's weighted sum once (fp32 accumulation).
Notation: T = tokens, k = choices per token, R = T * k, P = parts (segments, at most 4 here), D = hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_SEGMENTS = 4


@triton.jit
def _to_segments(x_ptr, slot_ptr, out_ptr, stride_x, stride_o, D, limit, K: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)  # one choice
    s = tl.load(slot_ptr + c)
    if s < limit:  # choices with nothing to run have slot == limit
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < D
        v = tl.load(x_ptr + (c // K) * stride_x + cols, mask=m)
        tl.store(out_ptr + s * stride_o + cols, v, mask=m)


@triton.jit
def _combine(y0, y1, y2, y3, slot_ptr, w_ptr, out_ptr, stride_y, stride_o, R, D,
             K: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # one token
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kk in tl.static_range(K):
        s = tl.load(slot_ptr + t * K + kk)
        w = tl.load(w_ptr + t * K + kk).to(tl.float32)
        seg = s // R  # P for a choice without a row: no segment matches, it adds nothing
        off = (s % R) * stride_y + cols
        acc += w * tl.load(y0 + off, mask=m & (seg == 0), other=0.0).to(tl.float32)
        if P > 1:
            acc += w * tl.load(y1 + off, mask=m & (seg == 1), other=0.0).to(tl.float32)
        if P > 2:
            acc += w * tl.load(y2 + off, mask=m & (seg == 2), other=0.0).to(tl.float32)
        if P > 3:
            acc += w * tl.load(y3 + off, mask=m & (seg == 3), other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def to_segments(x: torch.Tensor, slot: torch.Tensor, parts: int, k: int) -> torch.Tensor:
    """Padded segments [P, R, D]: row slot[c] holds x[c // k]; other rows are left uninitialised."""
    x = x.contiguous()
    R, D = slot.numel(), x.shape[1]
    out = x.new_empty(parts * R, D)
    if R and D:
        _to_segments[(R, triton.cdiv(D, BLOCK))](x, slot.contiguous(), out, x.stride(0), out.stride(0), D,
                                                 parts * R, K=k, BLOCK=BLOCK)
    return out.view(parts, R, D)


def combine_segments(y: list[torch.Tensor], slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, D]: sum over each token's choices of weight x its output row (y[slot // R][slot % R])."""
    T, k = weights.shape
    R, D = y[0].shape
    if len(y) > MAX_SEGMENTS or any(t.stride() != y[0].stride() or t.shape != y[0].shape for t in y):
        raise ValueError(f"combine_segments takes up to {MAX_SEGMENTS} outputs of one shape and layout")
    if y[0].stride(1) != 1:
        y = [t.contiguous() for t in y]
    out = y[0].new_empty(T, D)
    if T and D:
        ys = list(y) + [y[0]] * (MAX_SEGMENTS - len(y))
        _combine[(T, triton.cdiv(D, BLOCK))](*ys, slot.contiguous(), weights.contiguous(), out, y[0].stride(0),
                                             out.stride(0), R, D, K=k, P=len(y), BLOCK=BLOCK)
    return out
