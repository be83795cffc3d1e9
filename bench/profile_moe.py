"""Where an MoE layer's forward time goes: a torch.profiler kernel table per configuration.

    python bench/profile_moe.py --shape qwen3_moe --tokens 16384 --rates 0,0.25
    python bench/profile_moe.py --shape cpu --tokens 2048          # CPU: operator table
    python bench/profile_moe.py --shape mixtral --tokens 8192 --train   # forward + backward, as bench/moe_layer.py

Profiles the plain layer and, with --rates, the same layer after DualSparse `sparsify` at each drop rate
(inference, bf16 on GPU, fp32 on CPU). Prints the top operators by device time and writes the tables to
$OUT (device runs) or bench/results as profile_moe.txt. --train profiles the plain layer's forward and
backward instead (training mode, the step bench/moe_layer.py times) beside the dense ceiling's.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from dualsparse import SHAPES, make_layer, tokens  # noqa: E402

from moestack.inference.dualsparse import set_drop_rate, sparsify  # noqa: E402


def table(fn, device: str, rows: int) -> str:
    """Profile three calls of fn after two warm-up calls; the top `rows` operators by device (or CPU) time."""
    for _ in range(2):
        fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3_moe", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rates", default="", help="DualSparse drop rates to profile too, e.g. 0,0.25")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--train", action="store_true", help="forward + backward of the plain layer and the dense ceiling")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d, f, E, k = SHAPES[args.shape]
    base, m = make_layer(d, f, E, k, device, dtype)
    x = tokens(args.tokens, d, m, device, dtype, seed=1)
    out = [f"# {args.shape} {args.tokens} tokens, {device}, {dtype}"]
    if args.train:
        from moe_layer import dense_ceiling, measure_step

        base.train()
        xg = x.detach().clone().requires_grad_(True)
        out += ["## plain layer, forward + backward", table(measure_step(lambda t: sum(base(t)), xg), device, args.rows)]
        ceiling = dense_ceiling(args.tokens, d, f, k, device, dtype)
        out += ["## dense ceiling, forward + backward", table(measure_step(ceiling, xg), device, args.rows)]
    with torch.no_grad():
        out += ["## plain layer", table(lambda: base(x), device, args.rows)]
        if args.rates:
            sparse = sparsify(copy.deepcopy(base), [tokens(args.tokens, d, m, device, dtype, seed=2)], 0.0)
            for rate in (float(r) for r in args.rates.split(",")):
                set_drop_rate(sparse, rate)
                out += [f"## DualSparse, drop rate {rate}", table(lambda: sparse(x), device, args.rows)]
    text = "\n".join(out)
    print(text)
    dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "profile_moe.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
