"""SwiGLU activation alone: eager PyTorch vs the Triton kernel, forward (and with a device row limit), GPU.

    python bench/swiglu.py

Rows are T·k expert rows of [N, 2f] bf16 at Mixtral-, OLMoE- and Qwen3-MoE-like shapes (16384 tokens).
"triton, half rows" runs the kernel on the same buffer with a device-side count of N/2 rows (DualSparse's
padded segments); it should cost half. GB/s counts the bytes that must move: read 2f, write f per row.
Medians of interleaved repetitions; JSON lines to $OUT or bench/results/swiglu.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, write_results  # noqa: E402
from grouped_gemm import timed  # noqa: E402

import moestack.moe.experts as experts_mod  # noqa: E402

SHAPES = {"mixtral": (14336, 2), "olmoe": (1024, 8), "qwen3_moe": (768, 8)}  # f, k


def with_impl(impl, fn):
    def run():
        old, experts_mod.SWIGLU_IMPL = experts_mod.SWIGLU_IMPL, impl
        try:
            return fn()
        finally:
            experts_mod.SWIGLU_IMPL = old
    return run


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/swiglu.py measures CUDA kernels: run it on a GPU machine")
    rows = []
    for shape, (f, k) in SHAPES.items():
        n = 16384 * k
        h = torch.randn(n, 2 * f, device="cuda", dtype=torch.bfloat16)
        half = torch.tensor([n // 2], device="cuda")
        fns = {
            "eager": with_impl("eager", lambda: experts_mod.swiglu(h)),
            "triton": with_impl("triton", lambda: experts_mod.swiglu(h)),
            "triton, half rows": with_impl("triton", lambda: experts_mod.swiglu(h, rows=half)),
        }
        with torch.no_grad():
            t = timed(fns, 30)
        for case, sec in t.items():
            moved = (n // 2 if "half" in case else n) * 3 * f * 2
            rows.append({"bench": "swiglu", "shape": shape, "rows": n, "case": case, "ms": sec * 1e3,
                         "GB_per_s": moved / sec / 1e9, "vs_eager": t["eager"] / sec,
                         "device": device_name("cuda")})
    print_table(rows, ["shape", "rows", "case", "ms", "GB_per_s", "vs_eager"])
    write_results("swiglu", rows)


if __name__ == "__main__":
    main()
