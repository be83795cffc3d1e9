"""The pieces of ReaLB's FP8 expert path, timed one by one at three EP-rank shapes (GPU).

    python3 bench/realb_kernels.py            # GPU; --tiny: the same table at toy sizes (a CPU smoke run)

Per shape (d_model, d_ff, local experts, rows), milliseconds, medians of 20:
- first projection: bf16 grouped GEMM (`torch._grouped_mm`), `torch._scaled_grouped_mm` rowwise with fast
  accumulation, the row quantization (Triton kernel vs three torch ops), the FP8 projection with the rows
  quantized there (`lowp.fp8_grouped_mm`) and with rows quantized before (the dispatcher's per-token fp8);
- SwiGLU into the down projection: the SwiGLU kernel then the row quantizer vs `lowp.swiglu_fp8` (one kernel);
- weight conversion of w13 [E, D, 2F]: the old way (inf-norm reduction, then a cast pass: two reads), the
  one-kernel quantize (`lowp.quantize_fp8`, scales and values), and the cast with kept scales (`lowp.cast_fp8`,
  what ReaLB runs), each with its HBM rate (bytes read + written / time);
- whole experts (both projections, SwiGLU between): bf16, FP8 with rows quantized on the rank, FP8 with the
  rows already fp8;
- the overlap ReaLB relies on, timed with CUDA events (GPU): a sleep kernel standing in for a dispatch of
  `window` ms (an NVLink-sized one for these rows) beside the weight conversion on a side stream, each alone and
  together, the sleep enqueued first or second, then the whole low rank (sleep, conversion, FP8 experts
  waiting for q13 / q2) against the FP8 experts alone; `ovl_*` are milliseconds, `hidden` says whether the
  conversion cost nothing beyond the window.
"""
import os
import argparse
import sys

import torch

sys.path.insert(0, "src"); sys.path.insert(0, "bench")
from common import time_fn, time_gpu, write_results  # noqa: E402
from moestack.inference.lowp import (cast_fp8, fp8_experts, fp8_grouped_mm, fp8_scales, fp8_supported,  # noqa: E402
                                     quantize_fp8, swiglu_fp8)
from moestack.moe.experts import GroupedExperts, swiglu  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--tiny", action="store_true", help="toy sizes on whatever device there is (a smoke run)")
ap.add_argument("--reps", type=int, default=20)
args = ap.parse_args()
if not torch.cuda.is_available() and not args.tiny:
    raise SystemExit("bench/realb_kernels.py times CUDA kernels: run it on a GPU (bash bench/suite.sh realb), or --tiny")
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
shapes = ((2048, 768, 16, 21000), (4096, 14336, 1, 7600), (4096, 14336, 2, 12000))
if args.tiny:
    shapes = ((64, 24, 4, 200), (128, 448, 1, 76))
T = lambda f: time_fn(f, dev, reps=args.reps)  # noqa: E731
rows = []


def events_ms(fn, reps: int) -> float:
    """Median GPU milliseconds of fn() between CUDA events (`common.time_gpu`)."""
    return time_gpu(fn, dev, reps=reps) * 1e3


def overlap(w, w2, k13, k2, q, q2, experts, window: float) -> dict:
    """The conversion beside a dispatch-sized sleep, and the whole low rank (see the module docstring)."""
    n = 10_000_000
    cycles_per_ms = n / events_ms(lambda: torch.cuda._sleep(n), 5)
    cycles = int(window * cycles_per_ms)
    side, hi = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)

    def low(sleep_first: bool, run_experts: bool, stream=side, sleep=True):
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        e13, e2 = torch.cuda.Event(), torch.cuda.Event()
        if sleep and sleep_first:
            torch.cuda._sleep(cycles)
        with torch.cuda.stream(stream):
            cast_fp8(w, k13, -2, out=q, transpose=True); e13.record()
            cast_fp8(w2, k2, -2, out=q2, transpose=True); e2.record()
        if sleep and not sleep_first:
            torch.cuda._sleep(cycles)
        main.wait_event(e13)
        if run_experts:
            experts()
        main.wait_event(e2)

    r = {"ovl_window": window, "ovl_sleep": events_ms(lambda: torch.cuda._sleep(cycles), args.reps),
         "ovl_conv": events_ms(lambda: low(True, False, sleep=False), args.reps),
         "ovl_both_sleep_first": events_ms(lambda: low(True, False), args.reps),
         "ovl_both_conv_first": events_ms(lambda: low(False, False), args.reps),
         "ovl_experts": events_ms(experts, args.reps),
         "ovl_low_sleep_first": events_ms(lambda: low(True, True), args.reps),
         "ovl_low_conv_first": events_ms(lambda: low(False, True), args.reps),
         "ovl_low_high_priority": events_ms(lambda: low(True, True, hi), args.reps)}
    r["hidden"] = r["ovl_low_sleep_first"] <= r["ovl_sleep"] + r["ovl_experts"] + 0.02
    r["max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}


for (D, F, E, N) in shapes:
    ex = GroupedExperts(E, D, F).to(dev, dt)
    w, w2 = ex.w13.detach(), ex.w2.detach()
    x = torch.randn(N, D, device=dev, dtype=dt)
    c = torch.full((E,), N // E, device=dev); c[-1] += N - int(c.sum())
    offs = torch.cumsum(c, 0).to(torch.int32)
    q, s = quantize_fp8(w, -2, transpose=True)
    q2, s2 = quantize_fp8(w2, -2, transpose=True)
    xq, xs = quantize_fp8(x, -1)
    h = torch.randn(N, 2 * F, device=dev, dtype=dt)  # a first projection's output
    r = {"d": D, "f": F, "experts": E, "rows": N}
    if fp8_supported(dev):
        r["bf16_gemm"] = T(lambda: torch._grouped_mm(x, w, offs=offs))
        r["sgmm_fast_accum"] = T(lambda: torch._scaled_grouped_mm(xq, q.transpose(-2, -1), xs, s, offs=offs,
                                                                   out_dtype=torch.bfloat16, use_fast_accum=True))
    r["quant_rows"] = T(lambda: quantize_fp8(x, -1))

    def tq():
        a = x.abs().amax(-1, keepdim=True).float() / 448
        return (x / a).to(torch.float8_e4m3fn)
    r["quant_rows_torch"] = T(tq)
    r["fp8_mm_rows_here"] = T(lambda: fp8_grouped_mm(x, q, s, c, dt))
    r["fp8_mm_rows_fp8"] = T(lambda: fp8_grouped_mm(xq, q, s, c, dt, xs))
    r["swiglu_then_quant"] = T(lambda: quantize_fp8(swiglu(h).contiguous(), -1))
    r["swiglu_fp8"] = T(lambda: swiglu_fp8(h))

    def conv_old():  # what ReaLB ran before: an inf-norm reduction, then a cast pass (two reads of w)
        sc = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).float().clamp_(min=1e-12) / 448.0
        return cast_fp8(w, sc, -2, out=q, transpose=True)
    r["conv_w13_old"] = T(conv_old)
    r["conv_w13_fused"] = T(lambda: quantize_fp8(w, -2, out=q, scale=s, transpose=True))
    kept = fp8_scales(w, -2)
    r["conv_w13_kept_scales"] = T(lambda: cast_fp8(w, kept, -2, out=q, transpose=True))
    r["experts_bf16"] = T(lambda: ex.run(x, c, w, w2))
    r["experts_fp8_rows_here"] = T(lambda: fp8_experts(x, c, q, s, q2, s2, dt))
    r["experts_fp8_rows_fp8"] = T(lambda: fp8_experts(xq, c, q, s, q2, s2, dt, xs))
    nbytes = w.numel() * (w.element_size() + 1)  # read bf16 once, write fp8 once: the floor
    out = {k: (round(v * 1e3, 4) if isinstance(v, float) else v) for k, v in r.items()}
    for k in ("conv_w13_old", "conv_w13_fused", "conv_w13_kept_scales"):
        out[k + "_tbps"] = round(nbytes / r[k] / 1e12, 2)
    if dev.type == "cuda":
        out.update(overlap(w, w2, kept, fp8_scales(w2, -2), q, q2, lambda: fp8_experts(x, c, q, s, q2, s2, dt),
                           N * D * 2 * 7 / 8 / 282e9 * 1e3))
    print(D, F, E, N, {k: v for k, v in out.items() if k not in ("d", "f", "experts", "rows")}, flush=True)
    rows.append({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", **out})
write_results("realb_kernels", rows)
