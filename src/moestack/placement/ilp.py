"""MoETuner's expert placement: MILPs (see `formulation`) solved with HiGHS, decomposed for large instances.

Search, all under one time limit:
1. Warm start: the best baseline (greedy, round robin, contiguous, random) by objective.
2. Chain pass: layer 0 for balance alone, then layer l given layer l-1 (block MILPs; the layer is
   one block when E*G is small, else rounds of gpu-pair blocks, a large-neighbourhood search whose
   every step is an exact MILP over its neighbourhood).
3. Refinement sweeps: each layer re-solved given both neighbours, alternating direction; a layer's new
   assignment is kept only if it lowers the objective (and keeps the load cap).
4. Small instances (at most `JOINT_MAX_VARS` x and y variables): the joint MILP over all layers, with the
   incumbent as an objective cut-off row (objective <= incumbent) that prunes every worse node.

scipy's milp takes no initial solution, so "warm start" means: the search starts from the best baseline,
every accepted step only lowers the objective, and the joint MILP gets the incumbent as cut-off. The
result is therefore never worse than any baseline on the objective.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from . import baselines
from .formulation import Problem, affinity, joint_size, solve_block, solve_joint
from .metrics import PlanReport
from .placement import Placement
from .trace import RoutingTrace

JOINT_MAX_VARS = 6000  # x + y variables up to which "auto" tries one joint MILP
JOINT_DECOMPOSED_SHARE = 0.3  # of the time limit for the decomposed pass when a joint MILP follows
FULL_LAYER_MAX_VARS = 128  # E * G up to which a layer is one block MILP; above, gpu-pair blocks
MAX_ROUNDS = 4  # rounds of gpu-pair block MILPs per layer visit
# Default per-layer load slack over balanced packing (max/mean); the "LPT + 0.02" reading of the
# paper's ILP 1 (balance within a tolerance of the best balance, then minimise transitions)
BALANCE_TOLERANCE = 0.02


class _Clock:
    """Splits what is left of a time budget evenly over the steps still to run."""

    def __init__(self, budget_s: float):
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        """Seconds to the deadline (negative once past it)."""
        return self.deadline - time.perf_counter()

    def share(self, steps_left: int) -> float:
        """An even share of the time left for each of ``steps_left`` steps."""
        return max(self.left(), 0.0) / max(steps_left, 1)


def _start_row(problem: Problem, gpu_of: np.ndarray, layer: int) -> np.ndarray:
    """Chain-pass starting point: the better of balanced packing and pure affinity with the layer before."""
    G = problem.num_gpus
    balanced = baselines.greedy_layer(problem.load[layer], G)
    if layer == 0:
        return balanced
    a = affinity(problem, gpu_of, layer, use_prev=True, use_next=False)  # [E, G]
    slots = np.repeat(np.arange(G), problem.shape[1] // G)  # gpu of each slot
    experts, slot = linear_sum_assignment(-a[:, slots])  # E x E assignment, S slots per gpu
    aligned = np.empty_like(balanced)
    aligned[experts] = slots[slot]
    if problem.ratio(aligned, layer) > problem.cap[layer]:
        return balanced
    scores = []
    for row in (balanced, aligned):
        gpu_of[layer] = row
        scores.append(problem.local(gpu_of, layer, use_next=False))
    return balanced if scores[0] <= scores[1] else aligned


def _blocks(problem: Problem, rng: np.random.Generator) -> list[np.ndarray]:
    """Gpu sets whose experts one sub-MILP re-places: the whole layer when small, else every pair of gpus."""
    L, E, G = problem.shape
    if E * G <= FULL_LAYER_MAX_VARS or G <= 2:
        return [np.arange(G)]
    pairs = [np.array(p) for p in itertools.combinations(range(G), 2)]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _may_improve(problem: Problem, row: np.ndarray, layer: int, a: np.ndarray, gpus: np.ndarray) -> bool:
    """False only when re-placing the experts of ``gpus`` provably cannot lower the objective.

    A better split needs either an expert that has more affinity to another gpu of the block than to
    its own (no exchange gains affinity otherwise), or a block that holds the most loaded gpu.
    """
    if len(gpus) == problem.num_gpus:
        return True
    loads = np.bincount(row, weights=problem.load[layer], minlength=problem.num_gpus)
    if np.isin(np.flatnonzero(loads >= loads.max() - 1e-12), gpus).any():
        return True
    inside = np.isin(row, gpus)
    own = a[inside, row[inside]]  # [B]
    best_elsewhere = a[np.ix_(inside, gpus)].max(axis=1)  # [B]
    return bool((best_elsewhere > own + 1e-12).any())


def _improve_layer(problem: Problem, gpu_of: np.ndarray, layer: int, use_next: bool, budget_s: float,
                   mip_gap: float, rng: np.random.Generator, stats: dict) -> bool:
    """Re-place one layer in place given its fixed neighbours; say whether it changed.

    Small layers are one sub-MILP; larger ones go through rounds of gpu-pair sub-MILPs (a large
    neighbourhood search whose steps are exact MILPs) until a round changes nothing or time is up.
    """
    deadline = time.perf_counter() + budget_s
    L = problem.shape[0]
    a = affinity(problem, gpu_of, layer, use_prev=True, use_next=use_next)
    neighbours = int(layer > 0) + int(use_next and layer < L - 1)
    blocks = _blocks(problem, rng)
    changed = False
    for _ in range(MAX_ROUNDS):
        improved = False
        for done, gpus in enumerate(blocks):
            left = deadline - time.perf_counter()
            if left <= 0:
                return changed
            if not _may_improve(problem, gpu_of[layer], layer, a, gpus):
                continue
            row = solve_block(problem, gpu_of, layer, a, neighbours, gpus, left / (len(blocks) - done),
                              mip_gap, break_symmetry=neighbours == 0)
            stats["subproblems"] += 1
            if _accept(problem, gpu_of, layer, row, use_next):
                improved = changed = True
        if not improved or len(blocks) == 1:
            break
    return changed


def _chain_pass(problem: Problem, clock: _Clock, sweeps: int, mip_gap: float, rng: np.random.Generator,
                stats: dict, bar: tqdm) -> np.ndarray:
    """Layer 0 for balance alone, then each layer given the one before it."""
    L, E, G = problem.shape
    gpu_of = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        gpu_of[layer] = _start_row(problem, gpu_of, layer)
        _improve_layer(problem, gpu_of, layer, False, clock.share(L * (1 + sweeps) - layer), mip_gap, rng, stats)
        bar.update(1)
    return gpu_of


def _refine(problem: Problem, gpu_of: np.ndarray, clock: _Clock, sweeps: int, mip_gap: float,
            rng: np.random.Generator, stats: dict, bar: tqdm) -> np.ndarray:
    """Re-solve each layer given both neighbours, alternating direction; keep only improvements."""
    L = problem.shape[0]
    gpu_of = gpu_of.copy()
    for sweep in range(sweeps):
        order = range(L) if sweep % 2 == 0 else range(L - 1, -1, -1)
        changed = False
        for done, layer in enumerate(order):
            if clock.left() <= 0:
                return gpu_of
            budget = clock.share(L * (sweeps - sweep) - done)
            changed |= _improve_layer(problem, gpu_of, layer, True, budget, mip_gap, rng, stats)
            bar.update(1)
        stats["sweeps"] = sweep + 1
        if not changed:
            break
    return gpu_of


def _accept(problem: Problem, gpu_of: np.ndarray, layer: int, row: np.ndarray | None, use_next: bool) -> bool:
    """Put ``row`` into ``gpu_of[layer]`` if it keeps the cap and lowers the objective; say whether it did."""
    if row is None or np.array_equal(row, gpu_of[layer]):
        return False
    if problem.ratio(row, layer) > max(problem.cap[layer], problem.ratio(gpu_of[layer], layer)) + 1e-9:
        return False
    before = problem.local(gpu_of, layer, use_next)
    old = gpu_of[layer].copy()
    gpu_of[layer] = row
    if problem.local(gpu_of, layer, use_next) < before - 1e-12:
        return True
    gpu_of[layer] = old
    return False


def _warm_start(problem: Problem, seed: int) -> tuple[str, np.ndarray, float]:
    """Best baseline by objective among those within the load cap: ``(name, gpu_of [L, E], objective)``."""
    trace, G = problem.trace, problem.num_gpus
    candidates = {
        "greedy": baselines.greedy(trace, G),
        "round_robin": baselines.round_robin(trace, G),
        "contiguous": baselines.contiguous(trace, G),
        "random": baselines.random(trace, G, seed),
    }
    rows = {name: p.to_array() for name, p in candidates.items()}
    scored = {name: problem.total(r) for name, r in rows.items() if problem.within_cap(r)}  # greedy always fits
    name = min(scored, key=scored.__getitem__)
    return name, rows[name], scored[name]


def solve_ilp(
    trace: RoutingTrace,
    num_gpus: int,
    time_limit: float = 30.0,
    comm_weight: float = 1.0,
    mip_gap: float = 1e-3,
    seed: int = 0,
    max_imbalance: float | None = None,
    joint: bool | None = None,
    sweeps: int = 2,
    balance_tolerance: float | None = BALANCE_TOLERANCE,
) -> tuple[Placement, PlanReport]:
    """Place experts by MILP: decomposed chain + refinement always, one joint MILP when small enough.

    Balance first, as MoETuner's ILP 1 does: each layer's max/mean gpu load stays within
    ``balance_tolerance`` of what balanced packing (greedy LPT) reaches, and cross-gpu transitions are
    minimised under that cap (None: no cap, the weighted objective alone). ``max_imbalance``: an absolute
    cap on each layer's max/mean instead (raised per layer to what balanced packing reaches where the cap is
    out of reach). ``joint``: True forces the joint MILP,
    False skips it, None (auto) runs it when it has at most `JOINT_MAX_VARS` x and y variables.
    ``time_limit`` (s) bounds the whole solve; ``seed`` fixes the order of the gpu-pair sub-MILPs.
    """
    start = time.perf_counter()
    baselines.contiguous(trace, num_gpus)  # raises a clear error when G does not divide E
    problem = Problem.build(trace, num_gpus, comm_weight, max_imbalance, balance_tolerance)
    warm_name, best, best_obj = _warm_start(problem, seed)
    report = PlanReport("ilp", best_obj, 0.0, mode="decomposed", warm_start=warm_name, warm_objective=best_obj)
    stats = {"subproblems": 0, "sweeps": 0}
    use_joint = joint if joint is not None else joint_size(problem) <= JOINT_MAX_VARS
    clock = _Clock(time_limit * (JOINT_DECOMPOSED_SHARE if use_joint else 1.0))
    rng = np.random.default_rng(seed)
    # progress: one step per layer sub-MILP of the chain and the refinement sweeps (sweeps may stop early)
    with tqdm(total=problem.shape[0] * (1 + sweeps), desc=f"ilp (<= {time_limit:g} s)", unit="layer",
              leave=False) as bar:
        best, best_obj = _decomposed(problem, best, best_obj, clock, sweeps, mip_gap, rng, stats, bar)
        stats["decomposed_objective"] = best_obj
        report.status = "time_limit" if clock.left() <= 0 else "heuristic"
        if use_joint:
            bar.set_description("ilp: joint MILP (HiGHS)")
            time_left = time_limit - (time.perf_counter() - start)
            best, best_obj = _joint(problem, best, best_obj, time_left, mip_gap, report, stats)
    report.objective, report.subproblems, report.details = best_obj, stats["subproblems"], stats
    report.solve_time_s = time.perf_counter() - start
    return Placement.from_array(best, num_gpus), report


def _decomposed(problem: Problem, best: np.ndarray, best_obj: float, clock: _Clock, sweeps: int,
                mip_gap: float, rng: np.random.Generator, stats: dict, bar: tqdm) -> tuple[np.ndarray, float]:
    """Chain pass, then refinement sweeps from the better of the chain and the warm start."""
    chain = _chain_pass(problem, clock, sweeps, mip_gap, rng, stats, bar)
    chain_obj = problem.total(chain)
    stats["chain_objective"] = chain_obj
    start = chain if chain_obj < best_obj else best
    refined = _refine(problem, start, clock, sweeps, mip_gap, rng, stats, bar)
    refined_obj = problem.total(refined)
    return (refined, refined_obj) if refined_obj < best_obj else (best, best_obj)


def _joint(problem: Problem, best: np.ndarray, best_obj: float, time_left: float, mip_gap: float,
           report: PlanReport, stats: dict) -> tuple[np.ndarray, float]:
    """Try the joint MILP with the incumbent as cut-off; keep whichever is better."""
    report.mode = "joint"
    gpu_of, code, gap = solve_joint(problem, best_obj, time_left, mip_gap)
    report.mip_gap = gap
    stats["joint_highs_status"] = code
    # HiGHS status 0: optimal within mip_gap (the cut-off never removes the optimum); 1: time limit
    report.status = {0: "optimal", 1: "time_limit"}.get(code, "heuristic")
    if gpu_of is not None:
        obj = problem.total(gpu_of)
        if obj < best_obj and problem.within_cap(gpu_of):
            return gpu_of, obj
    return best, best_obj
