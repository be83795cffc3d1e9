"""Low-precision expert GEMMs for ReaLB: FP8 (e4m3, per-row / per-column scales) and FP4 (e2m1) numerics.

FP8 W8A8: activations get one scale per row, weights one per output column (over the reduction dim),
the layout `torch._scaled_grouped_mm` takes on Hopper (H100/H200 FP8 tensor cores). Elsewhere (CPU, older
GPUs) `fp8_grouped_mm` computes the same numbers by dequantizing the fp8 values to fp32 and multiplying
there: slowly, but what the tests compare against.
FP4 W4A4 (NVFP4 numerics): e2m1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with one e4m3 scale per 16 elements
along the reduction dim and one fp32 scale per tensor. H200 has no FP4 tensor cores, so FP4 is emulated
(quantize, dequantize, multiply in the compute dtype): it measures accuracy, never speed.
Notation: N rows, K reduction dim, M output dim, E experts.
"""

from __future__ import annotations

import torch

from moestack.moe.experts import grouped_mm, loop_mm, triton_runs

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 16
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_fp8(x: torch.Tensor, dim: int, out: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 values of x with one fp32 scale per vector along `dim` (the reduction dim): x ~ q * scale.

    x: [..., K, M] with dim=-2 (weights: a scale per output column, [..., M]) or [N, K] with dim=-1
    (activations: a scale per row, [N]). transpose=True writes q as [..., M, K] (weights, for the
    column-major operand `torch._scaled_grouped_mm` wants). `out` / `scale` are reused buffers (ReaLB's
    per-layer conversion buffer); on CUDA one Triton kernel reads x and writes both (inference/lowp_triton.py).
    """
    if triton_runs(x) and x.is_cuda and x.dim() in (2, 3):
        from moestack.inference.lowp_triton import quantize_fp8_triton

        return quantize_fp8_triton(x, dim, out, scale, transpose)
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    s = amax.clamp(min=1e-12) / FP8_MAX
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    s = s.squeeze(dim)
    if transpose:
        q = q.transpose(-2, -1)
    if out is not None:
        q = out.copy_(q)
    if scale is not None:
        s = scale.copy_(s)
    return q.contiguous() if out is None else q, s


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 values of q (fp8) times its scales (scale has q's shape without `dim`)."""
    return q.float() * scale.unsqueeze(dim)


def fp8_scales(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The fp32 scales `quantize_fp8` gives x along `dim` (abs-max / 448), without the fp8 values."""
    amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=dim).float().clamp_(min=1e-12)
    # divided by a tensor: on CUDA torch divides by a Python scalar as a product with its reciprocal, one ulp
    # off the IEEE quotient the kernels and the CPU compute
    return amax / torch.full_like(amax, FP8_MAX)


def cast_fp8(x: torch.Tensor, scale: torch.Tensor, dim: int, out: torch.Tensor | None = None,
             transpose: bool = False) -> torch.Tensor:
    """The fp8 values `quantize_fp8` writes, for scales already known (scale has x's shape without `dim`).

    ReaLB keeps its weights' scales (the weights do not change between forwards), so converting a rank's
    experts is this one read of the bf16 weights and one write of fp8, on CUDA one Triton kernel.
    """
    if triton_runs(x) and x.is_cuda and x.dim() in (2, 3):
        from moestack.inference.lowp_triton import cast_fp8_triton

        return cast_fp8_triton(x, scale, dim, out, transpose)
    q = (x.float() / scale.unsqueeze(dim)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if transpose:
        q = q.transpose(-2, -1)
    return q.contiguous() if out is None else out.copy_(q)


def swiglu_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows [N, F] and row scales [N] of swiglu(h) for h [N, 2F]: the down projection's quantized input.
    On CUDA one Triton kernel (the activation itself is never written); elsewhere swiglu, then quantize_fp8."""
    if triton_runs(h) and h.is_cuda and h.dim() == 2 and h.shape[1] <= 32768:
        from moestack.inference.lowp_triton import swiglu_fp8_triton

        return swiglu_fp8_triton(h)
    from moestack.moe.experts import swiglu

    return quantize_fp8(swiglu(h).contiguous(), dim=-1)


def fp8_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_grouped_mm` runs here: CUDA with compute capability 9.x (Hopper)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm") and torch.cuda.get_device_capability(device)[0] == 9


def fp8_grouped_mm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, counts: torch.Tensor,
                   out_dtype: torch.dtype, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows x [N, K] (grouped by expert, counts [E]) times fp8 experts wq [E, M, K] (scales [E, M]): [N, M].

    x is either in a float dtype, and then quantized here (one scale per row), or already fp8 with its row
    scales x_scale [N] (quantized before the dispatch, or by `swiglu_fp8`). On Hopper one
    `torch._scaled_grouped_mm`; elsewhere the same fp8 values dequantized and multiplied in fp32.
    """
    if x.dtype == FP8:
        xq = x
        if x_scale is None:
            raise ValueError("fp8_grouped_mm: fp8 rows need their row scales (x_scale)")
    else:
        xq, x_scale = quantize_fp8(x, dim=-1)
    if fp8_supported(xq.device):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        # fast accumulation (Hopper's FP8 tensor-core accumulator, as vLLM's FP8 GEMMs use): 1.43x / 1.69x
        # faster than without at Qwen3-VL / Mixtral rank shapes on an H200, and without it FP8 is slower
        # than bf16 there (0.45 vs 0.24 ms at Qwen3-VL, bench/realb.py notes, 2026-12-03)
        y = torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), x_scale, w_scale, offs=offsets,
                                     out_dtype=torch.bfloat16, use_fast_accum=True)  # bf16: what the kernels take
        return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
    xd = dequantize_fp8(xq, x_scale, -1)  # [N, K] fp32
    wd = dequantize_fp8(wq, w_scale, -1).transpose(-2, -1)  # [E, K, M] fp32
    return _mm(xd, wd, counts).to(out_dtype)


def fp8_experts(x: torch.Tensor, counts: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, q2: torch.Tensor,
                s2: torch.Tensor, out_dtype: torch.dtype, x_scale: torch.Tensor | None = None,
                before_down=None) -> torch.Tensor:
    """SwiGLU experts in FP8: rows x [N, D] by expert (counts [E]; bf16, or fp8 with row scales x_scale [N])
    through q13 [E, 2F, D] and q2 [E, D, F] (fp8, with their column scales s13 [E, 2F], s2 [E, D]): [N, D].
    The activation goes from the first GEMM's output to fp8 in one step (`swiglu_fp8`). before_down: called
    between the projections (ReaLB waits there for q2, whose conversion overlaps the first GEMM)."""
    h = fp8_grouped_mm(x, q13, s13, counts, out_dtype, x_scale)
    a, a_scale = swiglu_fp8(h)
    if before_down is not None:
        before_down()
    return fp8_grouped_mm(a, q2, s2, counts, out_dtype, a_scale)


def fake_fp4(x: torch.Tensor, dim: int = -1, block: int = FP4_BLOCK) -> torch.Tensor:
    """x rounded to NVFP4 numerics and back (same shape and dtype): e2m1 values, an e4m3 scale per `block`
    elements along `dim`, one fp32 scale for the tensor (so the block scales fit e4m3's range)."""
    xt = x.float().movedim(dim, -1)
    K = xt.shape[-1]
    if K % block:
        raise ValueError(f"fake_fp4: the reduction dim has {K} elements, not a multiple of the block size {block}; "
                         "pick a model whose expert sizes are multiples of 16")
    blocks = xt.reshape(*xt.shape[:-1], K // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)  # [..., K/16, 1]
    g = (amax.amax().clamp(min=1e-12) / (FP4_MAX * FP8_MAX))  # tensor scale: block scales <= 448
    s = (amax / FP4_MAX / g).to(FP8).float() * g  # e4m3 block scales, as NVFP4 stores them
    s = torch.where(s > 0, s, torch.ones_like(s))
    v = (blocks / s).clamp(-FP4_MAX, FP4_MAX)
    grid = torch.tensor(_E2M1, device=x.device)
    idx = torch.bucketize(v.abs().contiguous(), (grid[1:] + grid[:-1]) / 2)  # nearest e2m1 magnitude (ties go up)
    q = grid[idx] * v.sign()
    return (q * s).reshape(xt.shape).movedim(-1, dim).to(x.dtype)


def fp4_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """W4A4 emulated: rows x [N, K] and experts w [E, K, M] both rounded to NVFP4 along K, then multiplied."""
    return _mm(fake_fp4(x, -1), fake_fp4(w, -2), counts)


def _mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dtype == torch.bfloat16:
        return grouped_mm(x, w.contiguous(), torch.cumsum(counts, 0).to(torch.int32))
    return loop_mm(x, w, counts.tolist())
