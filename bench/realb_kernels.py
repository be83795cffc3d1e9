"""The pieces of ReaLB's FP8 expert path, timed one by one at three EP-rank shapes (GPU).

    python3 bench/realb_kernels.py

Per shape (d_model, d_ff, local experts, rows): the bf16 grouped GEMM (`torch._grouped_mm`, the first
projection), `torch._scaled_grouped_mm` rowwise with and without fast accumulation, the row quantization
(Triton kernel vs three torch ops), the weight conversion (inference/lowp_triton.py) and the whole FP8
first projection (`lowp.fp8_grouped_mm`: row quantization + scaled GEMM). Milliseconds, medians of 20.
"""
import sys, torch
sys.path.insert(0, "src"); sys.path.insert(0, "bench")
from common import time_fn
from moestack.inference.lowp import quantize_fp8, fp8_grouped_mm
from moestack.moe.experts import grouped_mm
if not torch.cuda.is_available():
    raise SystemExit("bench/realb_kernels.py times CUDA kernels: run it on a GPU (bash bench/suite.sh realb)")
dev = torch.device("cuda")
for (D, F, E, N) in ((2048, 768, 16, 21000), (4096, 14336, 1, 7600), (4096, 14336, 2, 12000)):
    x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, D, 2 * F, device=dev, dtype=torch.bfloat16) * 0.02
    c = torch.full((E,), N // E, device=dev); c[-1] += N - int(c.sum())
    offs = torch.cumsum(c, 0).to(torch.int32)
    q, s = quantize_fp8(w, -2, transpose=True)
    xq, xs = quantize_fp8(x, -1)
    r = {}
    r["bf16_gemm"] = time_fn(lambda: grouped_mm(x, w, offs), dev, reps=20)
    r["sgmm_only"] = time_fn(lambda: torch._scaled_grouped_mm(xq, q.transpose(-2, -1), xs, s, offs=offs, out_dtype=torch.bfloat16), dev, reps=20)
    r["sgmm_fast_accum"] = time_fn(lambda: torch._scaled_grouped_mm(xq, q.transpose(-2, -1), xs, s, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True), dev, reps=20)
    r["quant_rows_triton"] = time_fn(lambda: quantize_fp8(x, -1), dev, reps=20)
    def tq():
        a = x.abs().amax(-1, keepdim=True).float() / 448
        return (x / a).to(torch.float8_e4m3fn)
    r["quant_rows_torch"] = time_fn(tq, dev, reps=20)
    r["quant_w_triton"] = time_fn(lambda: quantize_fp8(w, -2, out=q, scale=s, transpose=True), dev, reps=20)
    r["fp8_mm_total"] = time_fn(lambda: fp8_grouped_mm(x, q, s, c, torch.bfloat16), dev, reps=20)
    print(D, F, E, N, {k: round(v * 1e3, 3) for k, v in r.items()})
