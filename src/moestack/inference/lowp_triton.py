"""FP8 quantization kernels (Triton): write fp8 values and fp32 scales at memory speed.

Unfused PyTorch (abs, amax, divide, clamp, cast) costs 0.38 ms for one Qwen3-VL rank's experts on an H200,
more than the 0.29 ms bf16 GEMM it should speed up (METHODS.md, ReaLB); ReaLB only pays if the conversion
runs at memory speed and hides under the dispatch.
- Activations [N, K] (a scale per row): one program per row holds the row in registers, one read, one write.
- SwiGLU straight to fp8 (the down projection's input): one program per row reads gate and up, writes the
  activation's fp8 values and its row scale; the bf16 activation never reaches memory.
- Weights [B, K, M] (a scale per column, q written transposed [B, M, K]): the scales from one inf-norm
  reduction, then a cast kernel, every [BK, BV] tile its own program. With the scales known (ReaLB keeps
  them: the weights do not change between forwards) only the cast runs: one read, one write, 2.7-3.2 TB/s
  at Mixtral shapes and 1.4 TB/s at Qwen3-VL's on the H200 with 64 x 64 tiles (bench/realb_kernels.py,
  2026-12-03); its tile is now autotuned per shape (`CAST_CONFIGS`).
Scales are divided in IEEE fp32 in the kernels (`div_rn`): torch's CUDA division by a scalar multiplies by
the reciprocal, one ulp off the CPU reference in half the columns (the H200 test, 2026-12-03).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK)
    m = ks < K
    t = tl.load(x_ptr + r * stride_x + ks, mask=m, other=0.0).to(tl.float32)
    _store_row_fp8(t, q_ptr, s_ptr, r, stride_q, ks, m)


@triton.jit
def _store_row_fp8(t, q_ptr, s_ptr, r, stride_q, cols, m):
    """Row r's values t (fp32) as fp8 with one scale: absmax / 448, divided in IEEE fp32 as torch does."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(t), axis=0), 1e-12), FP8_MAX)
    tl.store(s_ptr + r, scale)
    t = tl.minimum(tl.maximum(tl.math.div_rn(t, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + r * stride_q + cols, t.to(q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_quantize_rows(h_ptr, q_ptr, s_ptr, F, stride_h, stride_q, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK)
    m = cs < F
    g = tl.load(h_ptr + r * stride_h + cs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r * stride_h + F + cs, mask=m, other=0.0).to(tl.float32)
    # rounded to h's dtype first, as `experts.swiglu` stores it: the fp8 values equal quantize(swiglu(h))
    a = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty).to(tl.float32)
    _store_row_fp8(a, q_ptr, s_ptr, r, stride_q, cs, m)


@triton.jit
def _quantize_tiles(x_ptr, q_ptr, s_ptr, V, K, stride_b, stride_v, stride_k, stride_qb, stride_qv, stride_qk,
                    BV: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    vs = tl.program_id(1) * BV + tl.arange(0, BV)
    ks = tl.program_id(2) * BK + tl.arange(0, BK)
    m = (vs[None, :] < V) & (ks[:, None] < K)
    t = tl.load(x_ptr + b * stride_b + vs[None, :] * stride_v + ks[:, None] * stride_k, mask=m, other=0.0)
    scale = tl.load(s_ptr + b * V + vs, mask=vs < V, other=1.0)
    t = tl.math.div_rn(t.to(tl.float32), scale[None, :])
    t = tl.minimum(tl.maximum(t, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + b * stride_qb + vs[None, :] * stride_qv + ks[:, None] * stride_qk,
             t.to(q_ptr.dtype.element_ty), mask=m)


# The cast transposes [BK, BV] tiles ([B, K, V] in, [B, V, K] out); the best tile depends on the shape, so on a
# GPU it is autotuned per (V, K) among these (the first conversion of each shape measures them).
CAST_CONFIGS = [triton.Config({"BV": bv, "BK": bk}, num_warps=w)
                for bv, bk, w in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (256, 64, 8), (64, 256, 8),
                                  (256, 128, 8))]
_quantize_tiles_tuned = triton.autotune(CAST_CONFIGS, key=["V", "K"])(_quantize_tiles)


def _row_warps(block: int) -> int:
    return 4 if block <= 4096 else 8 if block <= 8192 else 16


def _layout(x: torch.Tensor, dim: int, out: torch.Tensor | None, transpose: bool):
    """x as [B, V, K]-strided (V: vectors that get a scale, K: the reduction dim) and q to write."""
    rows = dim in (-1, x.dim() - 1)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # [B, K, M] (columns) or [1, N, K] (rows)
    B = x3.shape[0]
    if rows:
        V, K, sv, sk = x3.shape[1], x3.shape[2], x3.stride(1), x3.stride(2)
    else:
        K, V, sv, sk = x3.shape[1], x3.shape[2], x3.stride(2), x3.stride(1)
    qshape = (B, V, K) if (transpose or rows) else (B, K, V)  # transpose=True: [B, V, K] (weights)
    q = out.view(qshape) if out is not None else torch.empty(qshape, device=x.device, dtype=torch.float8_e4m3fn)
    qs = (q.stride(0), q.stride(1), q.stride(2)) if qshape == (B, V, K) else (q.stride(0), q.stride(2), q.stride(1))
    return x3, q, B, V, K, (x3.stride(0), sv, sk), qs


def quantize_fp8_triton(x: torch.Tensor, dim: int, out: torch.Tensor | None, scale: torch.Tensor | None,
                        transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`lowp.quantize_fp8` on CUDA: same arguments, same results (round to nearest even, as `.to(fp8)`)."""
    rows = dim in (-1, x.dim() - 1)
    if x.dim() == 2 and rows and x.stride(1) == 1 and x.shape[1] <= 16384:
        N, K = x.shape
        q = out if out is not None else torch.empty(N, K, device=x.device, dtype=torch.float8_e4m3fn)
        s = scale if scale is not None else torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            block = triton.next_power_of_2(K)
            _quantize_rows[(N,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=_row_warps(block))
        return q, s
    # the scales from one inf-norm reduction (divided by a tensor: IEEE, as the CPU), then the cast kernel.
    # A one-kernel version (per column strip: abs-max over K, then the cast, the second read from L2) measured
    # slower on the H200: 0.30 vs 0.19 ms for one Mixtral expert's w13 (bench/realb_kernels.py, 2026-12-03)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    amax = torch.linalg.vector_norm(x3, ord=float("inf"), dim=2 if rows else 1).float().clamp_(min=1e-12)  # [B, V]
    s3 = torch.div(amax, torch.full_like(amax, 448.0), out=scale.view_as(amax) if scale is not None else None)
    q = cast_fp8_triton(x, s3, dim, out, transpose)
    if x.dim() == 2:
        return q, s3.squeeze(0)
    return q, s3


def cast_fp8_triton(x: torch.Tensor, scale: torch.Tensor, dim: int, out: torch.Tensor | None,
                    transpose: bool) -> torch.Tensor:
    """`lowp.cast_fp8` on CUDA: fp8 values of x for scales already known (one read of x, one write of q)."""
    x3, q, B, V, K, xs, qs = _layout(x, dim, out, transpose)
    if B and V and K:
        args = (x3, q, scale.reshape(B, V), V, K, *xs, *qs)
        if x.is_cuda:
            _quantize_tiles_tuned[lambda m: (B, triton.cdiv(V, m["BV"]), triton.cdiv(K, m["BK"]))](*args)
        else:  # Triton's interpreter (CPU tests): one tile size
            _quantize_tiles[(B, triton.cdiv(V, 64), triton.cdiv(K, 64))](*args, BV=64, BK=64)
    return q.squeeze(0) if x.dim() == 2 else q


def swiglu_fp8_triton(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lowp.swiglu_fp8` on CUDA: fp8 rows [N, F] and row scales [N] of swiglu(h) for h [N, 2F]."""
    if h.stride(1) != 1:
        h = h.contiguous()
    N, F = h.shape[0], h.shape[1] // 2
    q = torch.empty(N, F, device=h.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(N, device=h.device, dtype=torch.float32)
    if N and F:
        block = triton.next_power_of_2(F)
        _swiglu_quantize_rows[(N,)](h, q, s, F, h.stride(0), q.stride(0), BLOCK=block, num_warps=_row_warps(block))
    return q, s
