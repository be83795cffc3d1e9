"""MoETuner placement bench (CPU): every method on synthetic traces at real MoE sizes.

    python bench/placement.py                 # Mixtral 32x8, OLMoE 16x64, DeepSeek-like 26x64 on 2/4/8 gpus
    python bench/placement.py --quick         # smaller traces, shorter ILP limit, 2 and 8 gpus
    python bench/placement.py --models deepseek --gpus 8 --time-limit 30
    python bench/placement.py --trace runs/x/trace.npz --gpus 2 4   # a recorded trace instead

Prints one table per trace and appends one JSON line per (trace, gpus, method) to
bench/results/placement.jsonl. Modelled times use the metrics.CostModel with each model's expert
sizes, at 150 GB/s (NVLink-class) and 24 GB/s (inter-node-like) per-gpu all-to-all bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moestack.placement import METHODS, CostModel, RoutingTrace, evaluate, solve
from moestack.placement.synthetic import synthetic_trace

RESULTS = Path(__file__).resolve().parent / "results" / "placement.jsonl"
LINKS = {"nvlink": 150e9, "slow": 24e9}  # bytes/s per gpu


@dataclass(frozen=True)
class Preset:
    """Shape of a real MoE model's routing: MoE layers, experts, top-k, and one expert's sizes."""

    name: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    ffn: int


PRESETS = {
    "mixtral": Preset("Mixtral-8x7B", 32, 8, 2, 4096, 14336),
    "olmoe": Preset("OLMoE-1B-7B", 16, 64, 8, 2048, 1024),
    "deepseek": Preset("DeepSeek-V2-Lite-like", 26, 64, 6, 2048, 1408),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of the bench."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--trace", nargs="*", default=[], help="recorded .npz traces to bench instead of synthetic ones")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per synthetic trace")
    p.add_argument("--skew", type=float, default=0.8, help="Zipf exponent of expert popularity")
    p.add_argument("--affinity", type=float, default=0.7, help="share of choices that follow the token's group")
    p.add_argument("--time-limit", type=float, default=30.0, help="ILP time limit (s)")
    p.add_argument("--ilp", nargs="+", default=["1", "1@1.05", "model", "model-slow"],
                   help="ILP variants, one row each: WEIGHT[@MAX_IMBALANCE]; WEIGHT 'model' / 'model-slow' is "
                   "the cost model's comm weight at 150 / 24 GB/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2048 tokens, 5 s ILP limit, 2 and 8 gpus")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.time_limit, args.gpus = 2048, 5.0, [2, 8]
    return args


def traces(args: argparse.Namespace) -> list[tuple[str, RoutingTrace, Preset | None]]:
    """The traces to bench: recorded files if given, else one synthetic trace per preset."""
    if args.trace:
        return [(path, RoutingTrace.load(path), None) for path in args.trace]
    out = []
    for key in args.models:
        pre = PRESETS[key]
        trace = synthetic_trace(pre.layers, pre.experts, pre.top_k, num_tokens=args.tokens, skew=args.skew,
                                affinity=args.affinity, seed=args.seed)
        out.append((f"{pre.name} {pre.layers}x{pre.experts} top{pre.top_k}", trace, pre))
    return out


def cost_models(preset: Preset | None) -> dict[str, CostModel]:
    """One cost model per link speed, with the preset's expert sizes (CostModel defaults otherwise)."""
    sizes = {} if preset is None else {"hidden_size": preset.hidden, "ffn_size": preset.ffn}
    return {link: CostModel(link_bandwidth=bw, **sizes) for link, bw in LINKS.items()}


def load_bound(trace: RoutingTrace, gpus: int) -> float:
    """Worst layer's lower bound on max/mean gpu load with E/G experts per gpu.

    The gpu holding the heaviest expert also holds E/G - 1 others, at least the lightest ones.
    """
    S = trace.num_experts // gpus
    loads = np.sort(trace.counts, axis=1)  # [L, E] ascending
    heaviest_gpu = loads[:, -1] + loads[:, : S - 1].sum(axis=1)  # [L]
    return float(np.max(np.maximum(1.0, heaviest_gpu / (trace.counts.sum(axis=1) / gpus))))


def ilp_variants(args, costs: dict[str, CostModel]) -> list[tuple[float, float | None]]:
    """``(comm_weight, max_imbalance)`` per ``--ilp`` spec; 'model' / 'model-slow' weights come from the
    cost model at 150 / 24 GB/s (the weight under which the ILP objective tracks the modelled time)."""
    named = {"model": costs["nvlink"], "model-slow": costs["slow"]}
    variants = []
    for spec in args.ilp:
        weight, _, cap = spec.partition("@")
        w = round(named[weight].comm_weight(), 3) if weight in named else float(weight)
        variants.append((w, float(cap) if cap else None))
    return variants


def bench_one(args, label: str, trace: RoutingTrace, preset: Preset | None, gpus: int) -> list[dict]:
    """Every method on one trace and gpu count: one result dict per method (one per ILP variant)."""
    costs = cost_models(preset)
    runs = [("ilp", w, cap) for w, cap in ilp_variants(args, costs)] + [(m, 1.0, None) for m in METHODS[1:]]
    rows = []
    for method, weight, cap in runs:
        placement, report = solve(trace, gpus, method, time_limit=args.time_limit, comm_weight=weight,
                                  seed=args.seed, max_imbalance=cap)
        metrics = {link: evaluate(placement, trace, weight, cost) for link, cost in costs.items()}
        m = metrics["nvlink"]
        name = method if method != "ilp" else f"ilp w={weight:g}" + (f" cap={cap:g}" if cap else "")
        rows.append({
            "trace": label, "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k,
            "tokens": trace.num_tokens, "gpus": gpus, "method": method, "comm_weight": weight, "max_imbalance": cap,
            "label": name, "status": report.status, "mode": report.mode, "max_load_ratio": m.max_load_ratio,
            "mean_load_ratio": m.mean_load_ratio, "load_bound": load_bound(trace, gpus),
            "cross_fraction": m.cross_fraction, "objective": m.objective, "solve_s": report.solve_time_s,
            **{f"model_ms_{link}": mm.step_ms for link, mm in metrics.items()},
            **{f"ep_ms_{link}": mm.ep_ms for link, mm in metrics.items()},  # moestack's EP flow (loads only)
        })
    for link in LINKS:  # speed-up of the modelled time against contiguous (plain EP), same run
        base = next(r for r in rows if r["method"] == "contiguous")
        for r in rows:
            r[f"speedup_{link}"] = base[f"model_ms_{link}"] / r[f"model_ms_{link}"]
            r[f"ep_speedup_{link}"] = base[f"ep_ms_{link}"] / r[f"ep_ms_{link}"]
    return rows


def format_rows(rows: list[dict]) -> str:
    """Aligned text table of bench results."""
    header = ("trace", "G", "method", "max/mean worst (bound)", "max/mean avg", "cross-gpu", "vs rr",
              "x contig 150GB/s", "x contig 24GB/s", "solve s")
    lines = [header]
    for r in rows:
        rr = next(o for o in rows if o["trace"] == r["trace"] and o["gpus"] == r["gpus"] and o["method"] == "round_robin")
        cut = 1 - r["cross_fraction"] / rr["cross_fraction"] if rr["cross_fraction"] else 0.0
        lines.append((r["trace"], str(r["gpus"]), r["label"], f"{r['max_load_ratio']:.3f} ({r['load_bound']:.2f})",
                      f"{r['mean_load_ratio']:.3f}",
                      f"{r['cross_fraction']:.3f}", f"{-cut:+.0%}", f"{r['speedup_nvlink']:.3f}x",
                      f"{r['speedup_slow']:.3f}x", f"{r['solve_s']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the table, append the JSON lines."""
    args = parse_args(argv)
    stamp = {"date": datetime.date.today().isoformat(), "machine": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
             "command": "python bench/placement.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    all_rows = []
    for label, trace, preset in traces(args):
        for gpus in args.gpus:
            if trace.num_experts % gpus:
                print(f"skip {label} on {gpus} gpus: {trace.num_experts} experts do not split evenly")
                continue
            rows = bench_one(args, label, trace, preset, gpus)
            print(format_rows(rows), flush=True)
            all_rows += rows
    print("\n" + format_rows(all_rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for row in all_rows:
            fh.write(json.dumps({**stamp, **row}, default=_jsonable) + "\n")
    print(f"\nappended {len(all_rows)} results to {args.out}")
    return 0


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
