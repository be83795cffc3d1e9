"""MoETuner's placement MILP, solved with HiGHS through ``scipy.optimize.milp``.

Notation: L layers, E experts, G gpus, S = E/G slots per gpu, c[l, e] tokens of expert e,
t[l, i, j] transitions, mean_l = sum_e c[l, e] / G, tot_l = sum_ij t[l, i, j], w = comm_weight.

Joint MILP (small instances):
    x[l, e, g] in {0, 1}     expert e of layer l on gpu g
    m[l] >= 0                max gpu load of layer l, in units of mean_l
    y[l, i, j, g] in [0, 1]  pair (i of l, j of l+1) both on gpu g; only where t[l, i, j] > 0
    sum_g x[l, e, g] = 1,  sum_e x[l, e, g] = S,  sum_e c[l, e] / mean_l * x[l, e, g] <= m[l]
    y[l, i, j, g] <= x[l, i, g],  y[l, i, j, g] <= x[l+1, j, g]
    minimise  sum_l m[l] + w * sum_l (1 - sum_ijg t[l, i, j] y[l, i, j, g] / tot_l)
y needs no integrality: at integral x the objective pushes each y to min(x, x') which is 0 or 1.
GPU labels are interchangeable, so layer 0 is symmetry-broken: the r-th heaviest expert of layer 0
may only use gpus 0..r.

Decomposed (any size): with the neighbouring layers fixed, y[l-1, i, j, g] = x[l, j, g] when gpu(i) = g,
so each layer's problem is linear in its own x (E*G binaries plus m): a chain pass solves layer 0 for
balance, then layer l given layer l-1; refinement sweeps re-solve each layer given both neighbours and
keep a layer's new assignment only if it lowers the objective.

Warm start: scipy's milp takes no initial solution. We start from the best baseline (greedy, round robin,
contiguous, random); every accepted step only lowers the objective, and the joint MILP gets the incumbent
as an objective cut-off row (objective <= incumbent), which prunes every node whose bound is worse.
The result is therefore never worse than any of those baselines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from . import baselines
from .metrics import PlanReport, cross_fractions, load_ratios, objective_of
from .placement import Placement
from .trace import RoutingTrace

JOINT_MAX_VARS = 6000  # x + y variables up to which "auto" tries one joint MILP


@dataclass(frozen=True)
class _Problem:
    """The trace, normalised: loads in units of the mean gpu load, transitions as fractions of their boundary."""

    load: np.ndarray  # [L, E], c[l, e] / mean_l
    frac: np.ndarray  # [L-1, E, E], t[l, i, j] / tot_l
    trace: RoutingTrace
    num_gpus: int
    comm_weight: float

    @classmethod
    def build(cls, trace: RoutingTrace, num_gpus: int, comm_weight: float) -> _Problem:
        counts = trace.counts.astype(np.float64)
        mean = counts.sum(axis=1, keepdims=True) / num_gpus  # [L, 1]
        tot = trace.transitions.sum(axis=(1, 2)).astype(np.float64)[:, None, None]  # [L-1, 1, 1]
        load = counts / np.where(mean > 0, mean, 1.0)
        frac = trace.transitions / np.where(tot > 0, tot, 1.0)
        return cls(load, frac, trace, num_gpus, comm_weight)

    @property
    def shape(self) -> tuple[int, int, int]:
        L, E = self.load.shape
        return L, E, self.num_gpus

    def total(self, gpu_of: np.ndarray) -> float:
        return objective_of(gpu_of, self.trace, self.num_gpus, self.comm_weight)

    def local(self, gpu_of: np.ndarray, layer: int) -> float:
        """The part of the objective that depends on ``gpu_of[layer]``."""
        L = self.shape[0]
        lo, hi = max(layer - 1, 0), min(layer + 1, L - 1)
        ratio = load_ratios(gpu_of[layer : layer + 1], self.trace.counts[layer : layer + 1], self.num_gpus)[0]
        cross = cross_fractions(gpu_of[lo : hi + 1], self.trace.transitions[lo:hi]).sum()
        return float(ratio + self.comm_weight * cross)


def _highs(c, A, lb, ub, integrality, var_lb, var_ub, time_limit: float, mip_gap: float):
    """Run HiGHS on ``min c.v  s.t.  lb <= A v <= ub,  var_lb <= v <= var_ub``; return scipy's result."""
    return milp(c, integrality=integrality, bounds=Bounds(var_lb, var_ub),
                constraints=LinearConstraint(A, lb, ub),
                options={"time_limit": max(time_limit, 0.01), "mip_rel_gap": mip_gap, "disp": False})


# --- one layer given its neighbours -------------------------------------------------------------


def _affinity(problem: _Problem, gpu_of: np.ndarray, layer: int, use_prev: bool, use_next: bool) -> np.ndarray:
    """``a[e, g]``: share of the neighbouring boundaries' pairs that stay on-gpu if expert e goes to g."""
    L, E, G = problem.shape
    a = np.zeros((E, G))
    if use_prev and layer > 0:
        a += problem.frac[layer - 1].T @ np.eye(G)[gpu_of[layer - 1]]  # [E, E] @ [E, G]
    if use_next and layer < L - 1:
        a += problem.frac[layer] @ np.eye(G)[gpu_of[layer + 1]]
    return a


def _solve_block(problem: _Problem, gpu_of: np.ndarray, layer: int, a: np.ndarray, neighbours: int,
                 gpus: np.ndarray, time_limit: float, mip_gap: float, break_symmetry: bool = False) -> np.ndarray | None:
    """Re-place the experts of ``layer`` that sit on ``gpus`` among those gpus, others fixed.

    Exact for the layer's part of the objective over that neighbourhood (all gpus: the whole layer).
    Returns the layer's new row ``[E]``, or None if HiGHS found no solution in time.
    """
    load = problem.load[layer]  # [E]
    experts = np.flatnonzero(np.isin(gpu_of[layer], gpus))  # [B]
    B, H = len(experts), len(gpus)
    others = np.bincount(gpu_of[layer], weights=load, minlength=problem.num_gpus)
    others[gpus] = 0.0
    n = B * H  # x[b, h] at b * H + h, then m, then the constant
    w = problem.comm_weight
    c = np.concatenate([-w * a[np.ix_(experts, gpus)].ravel(), [1.0, w * neighbours]])
    A = sparse.vstack([_assignment_rows(B, H, n + 2), _cardinality_rows(B, H, n + 2),
                       _makespan_rows(load[experts], H, n, n + 2)]).tocsr()
    lb = np.concatenate([np.ones(B), np.full(H, B // H), np.full(H, -np.inf)])
    ub = np.concatenate([np.ones(B), np.full(H, B // H), np.zeros(H)])
    sym = _symmetry_ub(load[experts], H) if break_symmetry else np.ones(n)
    var_lb = np.concatenate([np.zeros(n), [others.max(), 1.0]])  # m >= load of every gpu left alone
    var_ub = np.concatenate([sym, [np.inf, 1.0]])  # the constant term's variable is fixed at 1
    integrality = np.concatenate([np.ones(n), [0, 0]])
    res = _highs(c, A, lb, ub, integrality, var_lb, var_ub, time_limit, mip_gap)
    if res.x is None:
        return None
    row = gpu_of[layer].copy()
    row[experts] = gpus[res.x[:n].reshape(B, H).argmax(axis=1)]
    return row


def _assignment_rows(E: int, G: int, width: int, offset: int = 0) -> sparse.csr_matrix:
    """``sum_g x[e, g] = 1`` for each e."""
    cols = offset + np.arange(E * G)
    return sparse.csr_matrix((np.ones(E * G), (np.repeat(np.arange(E), G), cols)), shape=(E, width))


def _cardinality_rows(E: int, G: int, width: int, offset: int = 0) -> sparse.csr_matrix:
    """``sum_e x[e, g] = S`` for each g."""
    cols = offset + np.arange(E * G)
    return sparse.csr_matrix((np.ones(E * G), (np.tile(np.arange(G), E), cols)), shape=(G, width))


def _makespan_rows(load: np.ndarray, G: int, m_col: int, width: int, offset: int = 0) -> sparse.csr_matrix:
    """``sum_e load[e] x[e, g] - m <= 0`` for each g."""
    E = load.shape[0]
    x_part = sparse.csr_matrix((np.repeat(load, G), (np.tile(np.arange(G), E), offset + np.arange(E * G))),
                               shape=(G, width))
    m_part = sparse.csr_matrix((-np.ones(G), (np.arange(G), np.full(G, m_col))), shape=(G, width))
    return x_part + m_part


def _symmetry_ub(load: np.ndarray, G: int) -> np.ndarray:
    """Upper bounds ``[E*G]`` that let the r-th heaviest expert use only gpus 0..r."""
    rank = np.empty(load.shape[0], dtype=np.int64)
    rank[np.argsort(-load, kind="stable")] = np.arange(load.shape[0])
    return (np.arange(G)[None, :] <= rank[:, None]).astype(np.float64).ravel()  # [E, G] -> [E*G]


# --- decomposition ------------------------------------------------------------------------------


class _Clock:
    """Splits what is left of a time budget evenly over the steps still to run."""

    def __init__(self, budget_s: float):
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, steps_left: int) -> float:
        return max(self.left(), 0.0) / max(steps_left, 1)


def _chain_pass(problem: _Problem, clock: _Clock, sweeps: int, mip_gap: float, stats: dict) -> np.ndarray:
    """Layer 0 for balance alone, then each layer given the one before it."""
    L, E, G = problem.shape
    gpu_of = np.stack([baselines.greedy_layer(problem.load[l], G) for l in range(L)])  # fallback rows
    for layer in range(L):
        a = _affinity(problem, gpu_of, layer, use_prev=True, use_next=False)
        row = _solve_layer(problem, problem.load[layer], a, int(layer > 0),
                           clock.share(L * (1 + sweeps) - layer), mip_gap, break_symmetry=layer == 0)
        stats["subproblems"] += 1
        if row is not None:
            gpu_of[layer] = row
    return gpu_of


def _refine(problem: _Problem, gpu_of: np.ndarray, clock: _Clock, sweeps: int, mip_gap: float,
            stats: dict) -> np.ndarray:
    """Re-solve each layer given both neighbours, alternating direction; keep only improvements."""
    L = problem.shape[0]
    gpu_of = gpu_of.copy()
    for sweep in range(sweeps):
        order = range(L) if sweep % 2 == 0 else range(L - 1, -1, -1)
        changed = False
        for done, layer in enumerate(order):
            if clock.left() <= 0:
                return gpu_of
            a = _affinity(problem, gpu_of, layer, use_prev=True, use_next=True)
            neighbours = int(layer > 0) + int(layer < L - 1)
            row = _solve_layer(problem, problem.load[layer], a, neighbours,
                               clock.share(L * (sweeps - sweep) - done), mip_gap, break_symmetry=False)
            stats["subproblems"] += 1
            changed |= _accept(problem, gpu_of, layer, row)
        stats["sweeps"] = sweep + 1
        if not changed:
            break
    return gpu_of


def _accept(problem: _Problem, gpu_of: np.ndarray, layer: int, row: np.ndarray | None) -> bool:
    """Put ``row`` into ``gpu_of[layer]`` if it lowers the objective; say whether it did."""
    if row is None or np.array_equal(row, gpu_of[layer]):
        return False
    before = problem.local(gpu_of, layer)
    old = gpu_of[layer].copy()
    gpu_of[layer] = row
    if problem.local(gpu_of, layer) < before - 1e-12:
        return True
    gpu_of[layer] = old
    return False


# --- joint MILP ---------------------------------------------------------------------------------


def _pairs(problem: _Problem) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nonzero transitions ``(i, j)`` per boundary: only those get y variables."""
    return [np.nonzero(f) for f in problem.frac]


def joint_size(problem: _Problem) -> int:
    """Number of x and y variables of the joint MILP."""
    L, E, G = problem.shape
    return L * E * G + G * sum(len(i) for i, _ in _pairs(problem))


def _solve_joint(problem: _Problem, cutoff: float | None, time_limit: float,
                 mip_gap: float) -> tuple[np.ndarray | None, int, float | None]:
    """The whole MILP at once; returns (gpu_of [L, E] or None, HiGHS status, gap)."""
    L, E, G = problem.shape
    w = problem.comm_weight
    pairs = _pairs(problem)
    nx = L * E * G
    ny = [G * len(i) for i, _ in pairs]
    y_off = np.concatenate([[0], np.cumsum(ny)]).astype(np.int64) + nx
    m_col = int(y_off[-1])
    const_col, width = m_col + L, m_col + L + 1

    c = np.zeros(width)
    c[m_col : m_col + L] = 1.0
    c[const_col] = w * (L - 1)
    rows, lb, ub = [], [], []
    for layer in range(L):
        off = layer * E * G
        rows += [_assignment_rows(E, G, width, off), _cardinality_rows(E, G, width, off),
                 _makespan_rows(problem.load[layer], G, m_col + layer, width, off)]
        lb += [np.ones(E), np.full(G, E // G), np.full(G, -np.inf)]
        ub += [np.ones(E), np.full(G, E // G), np.zeros(G)]
    for layer, (i, j) in enumerate(pairs):
        ycols = y_off[layer] + np.arange(ny[layer])  # y[pair p, gpu g] at p * G + g
        c[ycols] = -w * np.repeat(problem.frac[layer][i, j], G)
        g = np.tile(np.arange(G), len(i))
        for xcols in (layer * E * G + np.repeat(i, G) * G + g, (layer + 1) * E * G + np.repeat(j, G) * G + g):
            rows.append(_difference_rows(ycols, xcols, width))  # y - x <= 0
            lb.append(np.full(len(ycols), -np.inf))
            ub.append(np.zeros(len(ycols)))
    if cutoff is not None:  # the incumbent as a bound: objective <= cutoff
        rows.append(sparse.csr_matrix(c[None, :]))
        lb.append([-np.inf])
        ub.append([cutoff + 1e-9 * max(1.0, abs(cutoff))])
    A = sparse.vstack(rows).tocsr()
    integrality = np.zeros(width)
    integrality[:nx] = 1
    var_lb = np.zeros(width)
    var_lb[const_col] = 1.0
    var_ub = np.concatenate([np.ones(nx), np.ones(m_col - nx), np.full(L, np.inf), [1.0]])
    var_ub[: E * G] = _symmetry_ub(problem.load[0], G)
    res = _highs(c, A, np.concatenate(lb), np.concatenate(ub), integrality, var_lb, var_ub, time_limit, mip_gap)
    if res.x is None:
        return None, int(res.status), getattr(res, "mip_gap", None)
    return res.x[:nx].reshape(L, E, G).argmax(axis=2), int(res.status), getattr(res, "mip_gap", None)


def _difference_rows(plus: np.ndarray, minus: np.ndarray, width: int) -> sparse.csr_matrix:
    """Rows ``v[plus[r]] - v[minus[r]]``."""
    n = len(plus)
    data = np.concatenate([np.ones(n), -np.ones(n)])
    r = np.concatenate([np.arange(n), np.arange(n)])
    return sparse.csr_matrix((data, (r, np.concatenate([plus, minus]))), shape=(n, width))


# --- front door ---------------------------------------------------------------------------------


def _warm_start(trace: RoutingTrace, num_gpus: int, comm_weight: float, seed: int) -> tuple[str, np.ndarray, float]:
    """Best baseline by objective: ``(name, gpu_of [L, E], objective)``."""
    candidates = {
        "greedy": baselines.greedy(trace, num_gpus),
        "round_robin": baselines.round_robin(trace, num_gpus),
        "contiguous": baselines.contiguous(trace, num_gpus),
        "random": baselines.random(trace, num_gpus, seed),
    }
    scored = {name: objective_of(p.to_array(), trace, num_gpus, comm_weight) for name, p in candidates.items()}
    name = min(scored, key=scored.get)  # type: ignore[arg-type]
    return name, candidates[name].to_array(), scored[name]


def solve_ilp(
    trace: RoutingTrace,
    num_gpus: int,
    time_limit: float = 30.0,
    comm_weight: float = 1.0,
    mip_gap: float = 1e-3,
    seed: int = 0,
    joint: bool | None = None,
    sweeps: int = 2,
) -> tuple[Placement, PlanReport]:
    """Place experts by MILP: decomposed chain + refinement always, one joint MILP when small enough.

    ``joint``: True forces the joint MILP, False skips it, None (auto) runs it when it has at most
    `JOINT_MAX_VARS` x and y variables. ``time_limit`` (s) bounds the whole solve.
    """
    start = time.perf_counter()
    baselines.contiguous(trace, num_gpus)  # raises a clear error when G does not divide E
    problem = _Problem.build(trace, num_gpus, comm_weight)
    warm_name, best, best_obj = _warm_start(trace, num_gpus, comm_weight, seed)
    report = PlanReport("ilp", best_obj, 0.0, mode="decomposed", warm_start=warm_name, warm_objective=best_obj)
    stats = {"subproblems": 0, "sweeps": 0}
    use_joint = joint if joint is not None else joint_size(problem) <= JOINT_MAX_VARS
    clock = _Clock(time_limit * (0.3 if use_joint else 1.0))
    best, best_obj = _decomposed(problem, best, best_obj, clock, sweeps, mip_gap, stats)
    stats["decomposed_objective"] = best_obj
    status = "time_limit" if clock.left() <= 0 else "heuristic"
    if use_joint:
        best, best_obj, status = _joint(problem, best, best_obj, time_limit - (time.perf_counter() - start),
                                        mip_gap, report, stats)
    report.objective, report.status, report.subproblems, report.details = best_obj, status, stats["subproblems"], stats
    report.solve_time_s = time.perf_counter() - start
    return Placement.from_array(best, num_gpus), report


def _decomposed(problem: _Problem, best: np.ndarray, best_obj: float, clock: _Clock, sweeps: int,
                mip_gap: float, stats: dict) -> tuple[np.ndarray, float]:
    """Chain pass, then refinement sweeps from the better of the chain and the warm start."""
    chain = _chain_pass(problem, clock, sweeps, mip_gap, stats)
    chain_obj = problem.total(chain)
    stats["chain_objective"] = chain_obj
    start = chain if chain_obj < best_obj else best
    refined = _refine(problem, start, clock, sweeps, mip_gap, stats)
    refined_obj = problem.total(refined)
    return (refined, refined_obj) if refined_obj < best_obj else (best, best_obj)


def _joint(problem: _Problem, best: np.ndarray, best_obj: float, time_left: float, mip_gap: float,
           report: PlanReport, stats: dict) -> tuple[np.ndarray, float, str]:
    """Try the joint MILP with the incumbent as cut-off; keep whichever is better."""
    report.mode = "joint"
    gpu_of, code, gap = _solve_joint(problem, best_obj, time_left, mip_gap)
    report.mip_gap = gap
    stats["joint_highs_status"] = code
    # HiGHS status 0: optimal within mip_gap (the cut-off never removes the optimum); 1: time limit
    status = {0: "optimal", 1: "time_limit"}.get(code, "heuristic")
    if gpu_of is not None:
        obj = problem.total(gpu_of)
        if obj < best_obj:
            return gpu_of, obj, status
    return best, best_obj, status
