"""FP8 quantization kernels (Triton): write fp8 values and fp32 scales at memory speed.

Unfused PyTorch (abs, amax, divide, clamp, cast) costs 0.38 ms for one Qwen3-VL rank's experts on an H200,
more than the 0.29 ms bf16 GEMM it should speed up (METHODS.md, ReaLB); ReaLB only pays if the conversion
runs at memory speed and hides under the dispatch.
- Activations [N, K] (a scale per row): one program per row holds the row in registers, one read, one write.
- Weights [B, K, M] (a scale per column, q written transposed [B, M, K]): the scales come from one
  inf-norm reduction (`torch.linalg.vector_norm`, one read), then every [BK, BV] tile is scaled, cast and
  stored by its own program (one more read). A two-pass kernel over K measured 0.67 TB/s here.
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
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(t), axis=0), 1e-12), FP8_MAX)  # IEEE division, as torch
    tl.store(s_ptr + r, scale)
    t = tl.minimum(tl.maximum(tl.math.div_rn(t, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + r * stride_q + ks, t.to(q_ptr.dtype.element_ty), mask=m)


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


def quantize_fp8_triton(x: torch.Tensor, dim: int, out: torch.Tensor | None, scale: torch.Tensor | None,
                        transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`lowp.quantize_fp8` on CUDA: same arguments, same results (round to nearest even, as `.to(fp8)`)."""
    fp8 = torch.float8_e4m3fn
    rows = dim in (-1, x.dim() - 1)
    if x.dim() == 2 and rows and x.stride(1) == 1 and x.shape[1] <= 16384:
        N, K = x.shape
        q = out if out is not None else torch.empty(N, K, device=x.device, dtype=fp8)
        s = scale if scale is not None else torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            block = triton.next_power_of_2(K)
            _quantize_rows[(N,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block,
                                 num_warps=4 if block <= 4096 else 8 if block <= 8192 else 16)
        return q, s
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # [B, K, M] (columns) or [1, N, K] (rows)
    B = x3.shape[0]
    if rows:
        V, K, sv, sk = x3.shape[1], x3.shape[2], x3.stride(1), x3.stride(2)
    else:
        K, V, sv, sk = x3.shape[1], x3.shape[2], x3.stride(2), x3.stride(1)
    amax = torch.linalg.vector_norm(x3, ord=float("inf"), dim=2 if rows else 1).float()  # [B, V], one read
    s3 = torch.div(amax.clamp_(min=1e-12), 448.0, out=scale.view(B, V) if scale is not None else None)
    qshape = (B, V, K) if (transpose or rows) else (B, K, V)  # transpose=True: [B, V, K] (weights)
    q = out.view(qshape) if out is not None else torch.empty(qshape, device=x.device, dtype=fp8)
    sqb, sqv, sqk = (q.stride(0), q.stride(1), q.stride(2)) if qshape == (B, V, K) else (q.stride(0), q.stride(2), q.stride(1))
    BV, BK = 64, 64
    grid = (B, triton.cdiv(V, BV), triton.cdiv(K, BK))
    _quantize_tiles[grid](x3, q, s3, V, K, x3.stride(0), sv, sk, sqb, sqv, sqk, BV=BV, BK=BK)
    if x.dim() == 2:
        return q.squeeze(0), s3.squeeze(0)
    return q, s3
