"""``moestack plan``: place experts from a routing trace and compare the placement with the baselines.

``moestack.cli`` wires these in:

    add_plan_parser(subparsers)        # adds "plan" and sets func=run_plan
    args = parser.parse_args(); sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .metrics import PlacementMetrics, PlanReport, evaluate
from .placement import PlacementError
from .plan import BALANCE_TOLERANCE, METHODS, solve
from .trace import RoutingTrace, TraceError


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan`` on an argparse sub-parser set; returns the new parser."""
    p = subparsers.add_parser(
        "plan",
        help="place experts on gpus from a routing trace (MoETuner ILP or a baseline)",
        description="Solve an expert-to-gpu placement from a routing trace, write it as JSON and "
        "compare it with every baseline (load balance, cross-gpu transitions, modelled time).",
    )
    p.add_argument("--trace", required=True, help="routing trace .npz (counts, transitions, top_k)")
    p.add_argument("--gpus", required=True, type=int, help="number of expert-parallel gpus (must divide E)")
    p.add_argument("--method", default="ilp", choices=METHODS, help="placement method (default: ilp)")
    p.add_argument("--out", required=True, help="placement JSON to write")
    p.add_argument("--time-limit", type=float, default=30.0, help="ILP time limit in seconds (default: 30)")
    p.add_argument("--comm-weight", type=float, default=1.0,
                   help="weight of the cross-gpu share of one layer boundary against the max/mean load "
                   "of one layer (default: 1.0; 0 = balance only, what moestack's own EP gains from: it sends "
                   "tokens home every layer)")
    p.add_argument("--mip-gap", type=float, default=1e-3, help="relative MIP gap for HiGHS (default: 1e-3)")
    p.add_argument("--max-imbalance", type=float, default=None,
                   help="optional hard cap on each layer's max/mean gpu load, e.g. 1.05 (ILP only; "
                   "replaces --balance-tolerance)")
    p.add_argument("--balance-tolerance", type=float, default=BALANCE_TOLERANCE,
                   help="ILP: each layer's max/mean load within this of balanced packing's (greedy LPT), then "
                   f"fewest cross-gpu transitions (MoETuner's balance first; default {BALANCE_TOLERANCE}; "
                   "inf = no cap, the weighted objective alone)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline and the ILP's search order")
    p.set_defaults(func=run_plan)
    return p


def _tolerance(args: argparse.Namespace) -> float | None:
    return None if args.balance_tolerance == float("inf") else args.balance_tolerance


def run_plan(args: argparse.Namespace) -> int:
    """Run ``moestack plan``; returns the exit code (0 ok, 2 bad input)."""
    try:
        _check_args(args)
        trace = RoutingTrace.load(args.trace)
        placement, report = solve(trace, args.gpus, args.method, time_limit=args.time_limit,
                                  comm_weight=args.comm_weight, mip_gap=args.mip_gap, seed=args.seed,
                                  max_imbalance=args.max_imbalance, balance_tolerance=_tolerance(args))
        placement.save(args.out)
    except (TraceError, PlacementError, PlanArgumentError, OSError) as err:
        print(f"moestack plan: error: {err}", file=sys.stderr)
        return 2
    rows = [(args.method, report, evaluate(placement, trace, args.comm_weight))]
    for method in METHODS[1:]:  # the baselines
        if method != args.method:
            other, other_report = solve(trace, args.gpus, method, comm_weight=args.comm_weight, seed=args.seed)
            rows.append((method, other_report, evaluate(other, trace, args.comm_weight)))
    print(f"trace {args.trace}: L={trace.num_layers} E={trace.num_experts} top_k={trace.top_k} "
          f"tokens={trace.num_tokens}; gpus={args.gpus}; comm_weight={args.comm_weight}")
    print(format_table(rows, chosen=args.method))
    best = min(rows, key=lambda row: row[2].ep_ms)
    if best[0] != args.method and best[2].ep_ms < rows[0][2].ep_ms * (1 - 1e-6):
        print(f"note: under moestack's EP (tokens return home every layer) {best[0]} models faster "
              f"({best[2].ep_ms:.2f} vs {rows[0][2].ep_ms:.2f} ms); --comm-weight 0 solves for balance alone")
    print(f"wrote {args.out} ({args.method}, {report.status})")
    return 0


class PlanArgumentError(ValueError):
    """A `moestack plan` flag out of range (checked before the trace is read or anything is solved)."""


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--time-limit", args.time_limit), ("--comm-weight", args.comm_weight),
                        ("--mip-gap", args.mip_gap), ("--max-imbalance", args.max_imbalance)):
        if value is not None and not math.isfinite(value):  # NaN passes every range check below
            raise PlanArgumentError(f"{flag} must be a finite number, got {value}")
    if args.gpus < 1:
        raise PlanArgumentError(f"--gpus must be a positive integer, got {args.gpus}")
    if args.time_limit <= 0:
        raise PlanArgumentError(f"--time-limit must be positive seconds, got {args.time_limit}")
    if args.comm_weight < 0:
        raise PlanArgumentError(f"--comm-weight must be >= 0, got {args.comm_weight}")
    if not 0 <= args.mip_gap < 1:
        raise PlanArgumentError(f"--mip-gap must be in [0, 1), got {args.mip_gap}")
    if not args.balance_tolerance >= 0:
        raise PlanArgumentError(f"--balance-tolerance must be >= 0 (a max/mean slack; inf = no cap), got {args.balance_tolerance}")
    if args.max_imbalance is not None and args.max_imbalance < 1:
        raise PlanArgumentError(f"--max-imbalance must be >= 1 (a max/mean load ratio), got {args.max_imbalance}")
    if Path(args.out).is_dir():
        raise PlanArgumentError(f"--out {args.out} is a folder; pass the path of the placement JSON file to write")


HEADER = ("method", "max/mean worst", "max/mean avg", "cross-gpu", "objective", "model ms", "vs contig",
          "moestack EP ms", "vs contig", "solve s")


def format_table(rows: list[tuple[str, PlanReport, PlacementMetrics]], chosen: str | None = None) -> str:
    """Plain aligned table, one row per method; the chosen one is starred; time relative to contiguous."""
    base = next((m for name, _, m in rows if name == "contiguous"), None)
    lines = [HEADER]
    for name, report, m in rows:
        speedup = f"{base.step_ms / m.step_ms:.3f}x" if base else "-"
        ep_speedup = f"{base.ep_ms / m.ep_ms:.3f}x" if base else "-"
        lines.append((name + (" *" if name == chosen else ""), f"{m.max_load_ratio:.3f}", f"{m.mean_load_ratio:.3f}",
                      f"{m.cross_fraction:.3f}", f"{m.objective:.3f}", f"{m.step_ms:.2f}", speedup,
                      f"{m.ep_ms:.2f}", ep_speedup, f"{report.solve_time_s:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m moestack.placement.cli plan ...``."""
    parser = argparse.ArgumentParser(prog="moestack")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
