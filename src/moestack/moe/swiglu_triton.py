"""SwiGLU of expert rows as one Triton kernel each way (CUDA only; `experts.swiglu` picks it).

Eager PyTorch runs silu and the product as two kernels over strided halves of h (read h, write silu(g),
read it back with u, write the product); this reads h once and writes the activation once, in fp32
registers. `rows` (a device int tensor, optional) limits the work to the leading rows without a host sync:
DualSparse's padded segments hold their valid rows first, and the rows past them are never read.
Layout: h [N, P * 2f] holds, per part, f gate columns then f up columns; the activation is [N, P * f].
"""

from __future__ import annotations

import functools

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["n"])
def _swiglu_fwd(h_ptr, out_ptr, rows_ptr, n, stride_h, stride_o, f, width,
                HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # a fixed grid of programs strides over the rows, so rows past a device-side count cost nothing
    n_rows = n
    if HAS_ROWS:  # compile-time branch
        n_rows = tl.minimum(tl.load(rows_ptr).to(tl.int32), n)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gcol = cols + (cols // f) * f  # the gate column of output column c = part p, neuron i: p * 2f + i
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)  # tl.cast, not r.to: the CPU interpreter hands the loop a Python int
        g = tl.load(h_ptr + row * stride_h + gcol, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * stride_h + gcol + f, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * stride_o + cols, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(h_ptr, grad_ptr, dh_ptr, stride_h, stride_g, stride_dh, f, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gcol = cols + (cols // f) * f
    g = tl.load(h_ptr + row * stride_h + gcol, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * stride_h + gcol + f, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(grad_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = go * u * s * (1.0 + g * (1.0 - s))  # d/dg [g * sigmoid(g)] = s + g s (1 - s)
    du = go * g * s
    ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + row * stride_dh + gcol, dg.to(ty), mask=mask)
    tl.store(dh_ptr + row * stride_dh + gcol + f, du.to(ty), mask=mask)


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs a strided-row launch uses: enough to fill every SM several times over (under the CPU
    interpreter a few, so the strided loop is still exercised)."""
    if device.type != "cuda":
        return 4
    return 32 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_fwd(h: torch.Tensor, parts: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Activation [N, parts * f] of h [N, parts * 2f]; with `rows`, only the first rows[0] rows are written."""
    h = _rows_major(h)
    n, width = h.shape[0], h.shape[1] // 2
    out = h.new_empty(n, width)
    if n and width:
        blocks = triton.cdiv(width, BLOCK)
        grid = (min(n, max(1, _programs(h.device) // blocks)), blocks)
        _swiglu_fwd[grid](h, out, rows if rows is not None else h, n, h.stride(0), out.stride(0), width // parts,
                          width, HAS_ROWS=rows is not None, BLOCK=BLOCK)
    return out


def swiglu_bwd(h: torch.Tensor, grad: torch.Tensor, parts: int) -> torch.Tensor:
    """Gradient of the activation's input h given the activation's gradient `grad` (every row)."""
    h, grad = _rows_major(h), _rows_major(grad)
    n, width = grad.shape
    dh = torch.empty_like(h)
    if n and width:
        grid = (n, triton.cdiv(width, BLOCK))
        _swiglu_bwd[grid](h, grad, dh, h.stride(0), grad.stride(0), dh.stride(0), width // parts, width,
                          BLOCK=BLOCK)
    return dh


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves h, recomputes silu in the backward kernel."""

    @staticmethod
    def forward(ctx, h, parts, rows):
        ctx.save_for_backward(h)
        ctx.parts = parts
        return swiglu_fwd(h, parts, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_bwd(h, grad, ctx.parts), None, None
