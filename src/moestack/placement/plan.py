"""``solve``: one front door for every placement method."""

from __future__ import annotations

import time

from . import baselines
from .ilp import BALANCE_TOLERANCE, solve_ilp
from .metrics import PlanReport, objective
from .placement import Placement
from .trace import RoutingTrace

METHODS = ("ilp", "greedy", "round_robin", "contiguous", "random")


def solve(
    trace: RoutingTrace,
    num_gpus: int,
    method: str = "ilp",
    time_limit: float = 30.0,
    comm_weight: float = 1.0,
    mip_gap: float = 1e-3,
    seed: int = 0,
    max_imbalance: float | None = None,
    balance_tolerance: float | None = BALANCE_TOLERANCE,
) -> tuple[Placement, PlanReport]:
    """Place the trace's experts on ``num_gpus`` gpus with ``method`` (one of `METHODS`).

    ``time_limit``, ``mip_gap``, ``max_imbalance`` and ``balance_tolerance`` concern the ILP only; ``seed`` the ILP and
    ``random``; ``comm_weight`` enters the ILP and every report's objective.
    """
    if method == "ilp":
        return solve_ilp(trace, num_gpus, time_limit=time_limit, comm_weight=comm_weight, mip_gap=mip_gap,
                         seed=seed, max_imbalance=max_imbalance, balance_tolerance=balance_tolerance)
    if method not in METHODS:
        raise ValueError(f"--method: unknown placement method {method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    if method == "random":
        placement = baselines.random(trace, num_gpus, seed)
    else:
        placement = getattr(baselines, method)(trace, num_gpus)
    elapsed = time.perf_counter() - start
    return placement, PlanReport(method, objective(placement, trace, comm_weight), elapsed)
