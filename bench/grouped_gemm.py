"""What torch._grouped_mm costs at MoE shapes, for DualSparse's layout decisions (GPU, bf16).

    python bench/grouped_gemm.py --shape mixtral
    python bench/grouped_gemm.py --shape qwen3_moe

Times one expert FFN's two grouped GEMMs (w13 then w2, no activation) on balanced groups for:
  full            all R rows, full width (the baseline)
  half_rows       R/2 rows, full width, exact buffer
  half_rows_pad   the same R/2 rows inside an R-row buffer (offsets end at R/2): are the rows past the
                  last offset skipped?
  half_width_view all R rows, the first half of every expert's neurons as a strided view of the weights
  half_width_copy the same with those weights copied contiguous: does the view cost extra?
  segments        R/2 rows at half width + R/2 rows at full width, two calls each (the 25%-drop mix)
Medians of interleaved repetitions; the ratio column is time / full. Writes JSON lines to $OUT or bench/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dualsparse import SHAPES  # noqa: E402


def offsets(rows: int, groups: int, device) -> torch.Tensor:
    """Cumulative ends of `groups` near-equal groups covering `rows` rows (int32)."""
    sizes = torch.full((groups,), rows // groups, dtype=torch.int64)
    sizes[: rows % groups] += 1
    return torch.cumsum(sizes, 0).to(device=device, dtype=torch.int32)


def ffn(x, w13, w2, offs):
    h = torch._grouped_mm(x, w13, offs=offs)
    return torch._grouped_mm(h[:, : w2.shape[1]], w2, offs=offs)  # a strided view, as SwiGLU output would be


def timed(fns: dict, reps: int) -> dict:
    for _ in range(3):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/grouped_gemm.py measures CUDA kernels: run it on a GPU machine")
    dev, dt = "cuda", torch.bfloat16
    d, f, E, k = SHAPES[args.shape]
    R = args.tokens * k
    torch.manual_seed(0)
    x = torch.randn(R, d, device=dev, dtype=dt)
    w13 = torch.randn(E, d, 2 * f, device=dev, dtype=dt) * d ** -0.5
    w2 = torch.randn(E, f, d, device=dev, dtype=dt) * f ** -0.5
    w13h, w2h = w13[:, :, :f], w2[:, : f // 2]  # the first half of the neurons ([g0 u0 | g1 u1] layout)
    w13hc, w2hc = w13h.contiguous(), w2h.contiguous()
    full, half = offsets(R, E, dev), offsets(R // 2, E, dev)
    xh = x[: R // 2].contiguous()
    fns = {
        "full": lambda: ffn(x, w13, w2, full),
        "half_rows": lambda: ffn(xh, w13, w2, half),
        "half_rows_pad": lambda: ffn(x, w13, w2, half),
        "half_width_view": lambda: ffn(x, w13h, w2h, full),
        "half_width_copy": lambda: ffn(x, w13hc, w2hc, full),
        "segments": lambda: (ffn(xh, w13h, w2h, half), ffn(xh, w13, w2, half)),
    }
    with torch.no_grad():
        t = timed(fns, args.reps)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    with open(out / "grouped_gemm.jsonl", "a") as fh:
        for key, s in t.items():
            row = {"bench": "grouped_gemm", "date": date, "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "shape": args.shape, "rows": R, "case": key, "ms": s * 1e3,
                   "ratio": s / t["full"]}
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
