"""FP8 quantization as one Triton kernel: read x once (twice from L2), write fp8 values and fp32 scales.

Unfused PyTorch (abs, amax, divide, clamp, cast) costs 0.38 ms for one Qwen3-VL rank's experts on an H200,
more than the 0.29 ms bf16 GEMM it should speed up (METHODS.md, ReaLB); ReaLB only pays if the conversion
runs at memory speed and hides under the dispatch. A program owns BV vectors (weight columns or activation
rows): pass 1 takes their abs-max over K, pass 2 scales, casts and stores them (its tiles are still in L2).
Layout: x [B, K, M] (dim=-2: vectors are columns) or [N, K] (dim=-1: vectors are rows); q [B, V, K].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, V, K, stride_b, stride_v, stride_k, stride_qb, stride_qv, stride_qk,
              BV: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    vs = tl.program_id(1) * BV + tl.arange(0, BV)
    vmask = vs < V
    base = x_ptr + b * stride_b
    amax = tl.zeros([BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        m = vmask[:, None] & (ks[None, :] < K)
        t = tl.load(base + vs[:, None] * stride_v + ks[None, :] * stride_k, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(t), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), FP8_MAX)  # IEEE division: the same scales as torch's
    tl.store(s_ptr + b * V + vs, scale, mask=vmask)
    qbase = q_ptr + b * stride_qb
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        m = vmask[:, None] & (ks[None, :] < K)
        t = tl.load(base + vs[:, None] * stride_v + ks[None, :] * stride_k, mask=m, other=0.0).to(tl.float32)
        t = tl.minimum(tl.maximum(tl.math.div_rn(t, scale[:, None]), -FP8_MAX), FP8_MAX)
        tl.store(qbase + vs[:, None] * stride_qv + ks[None, :] * stride_qk, t.to(q_ptr.dtype.element_ty), mask=m)


# Tile shapes are tuned per layout on the GPU (columns of weights: stride_v == 1; rows: stride_k == 1 - Triton
# specializes strides of 1, so each layout gets its own coalesced loads); the interpreter takes one fixed tile.
_CONFIGS = [triton.Config({"BV": bv, "BK": bk}, num_warps=w)
            for bv, bk, w in ((16, 256, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8),
                              (8, 512, 4), (128, 32, 4))]
_quantize_tuned = triton.autotune(_CONFIGS, key=["K", "stride_v", "stride_k"])(_quantize_kernel)  # not V: rows vary


@triton.jit
def _quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    """Activations: one program per row, the whole row in registers, one read and one write."""
    r = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK)
    m = ks < K
    t = tl.load(x_ptr + r * stride_x + ks, mask=m, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(t), axis=0), 1e-12), FP8_MAX)
    tl.store(s_ptr + r, scale)
    t = tl.minimum(tl.maximum(tl.math.div_rn(t, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + r * stride_q + ks, t.to(q_ptr.dtype.element_ty), mask=m)


def quantize_fp8_triton(x: torch.Tensor, dim: int, out: torch.Tensor | None, scale: torch.Tensor | None,
                        transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`lowp.quantize_fp8` on CUDA: same arguments, same results (round to nearest even, as `.to(fp8)`)."""
    if x.dim() == 2 and dim in (-1, 1) and x.stride(1) == 1 and x.shape[1] <= 16384:  # rows: the one-pass kernel
        N, K = x.shape
        q = out if out is not None else torch.empty(N, K, device=x.device, dtype=torch.float8_e4m3fn)
        s = scale if scale is not None else torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            block = triton.next_power_of_2(K)
            _quantize_rows[(N,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block,
                                 num_warps=4 if block <= 4096 else 8 if block <= 8192 else 16)
        return q, s
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # [B, K, M] or [1, N, K]
    B = x3.shape[0]
    if dim in (-2, x.dim() - 2):  # vectors are columns: V = M, reduce over K = dim -2
        K, V = x3.shape[1], x3.shape[2]
        sv, sk = x3.stride(2), x3.stride(1)
    else:  # vectors are rows: V = N, reduce over the last dim
        V, K = x3.shape[1], x3.shape[2]
        sv, sk = x3.stride(1), x3.stride(2)
    # q in the caller's layout: transpose=True -> [B, V, K] (weights), else x's own shape
    qshape = (B, V, K) if (transpose or dim in (-1, x.dim() - 1)) else (B, K, V)
    q = out.view(qshape) if out is not None else torch.empty(qshape, device=x.device, dtype=torch.float8_e4m3fn)
    s = scale.view(B, V) if scale is not None else torch.empty(B, V, device=x.device, dtype=torch.float32)
    if qshape == (B, V, K):
        sqb, sqv, sqk = q.stride(0), q.stride(1), q.stride(2)
    else:
        sqb, sqv, sqk = q.stride(0), q.stride(2), q.stride(1)
    args = (x3, q, s, V, K, x3.stride(0), sv, sk, sqb, sqv, sqk)
    if x.is_cuda:
        _quantize_tuned[lambda meta: (B, triton.cdiv(V, meta["BV"]))](*args)
    else:
        _quantize_kernel[(B, triton.cdiv(V, 64))](*args, BV=64, BK=64)
    if x.dim() == 2:
        return q.squeeze(0), s.squeeze(0)
    return q, s
