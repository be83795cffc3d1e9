"""The placement MILPs handed to HiGHS (``scipy.optimize.milp``): the joint model and the per-layer block model.

Notation: L layers, E experts, G gpus, S = E/G slots per gpu, c[l, e] tokens of expert e,
t[l, i, j] transitions, mean_l = sum_e c[l, e] / G, tot_l = sum_ij t[l, i, j], w = comm_weight.

Joint MILP:
    x[l, e, g] in {0, 1}     expert e of layer l on gpu g
    m[l] in [0, cap_l]       max gpu load of layer l, in units of mean_l (cap_l = inf unless asked for)
    y[l, i, j, g] in [0, 1]  pair (i of l, j of l+1) both on gpu g; only where t[l, i, j] > 0
    sum_g x[l, e, g] = 1,  sum_e x[l, e, g] = S,  sum_e c[l, e] / mean_l * x[l, e, g] <= m[l]
    y[l, i, j, g] <= x[l, i, g],  y[l, i, j, g] <= x[l+1, j, g]
    minimise  sum_l m[l] + w * sum_l (1 - sum_ijg t[l, i, j] y[l, i, j, g] / tot_l)
y needs no integrality: at integral x the objective pushes each y up to min(x, x'), which is 0 or 1.
GPU labels are interchangeable, so layer 0 is symmetry-broken: its r-th heaviest expert may only use
gpus 0..r (relabel gpus by the heaviest expert they hold to reach that form).

Block MILP: with layers l-1 and l+1 fixed, y[l-1, i, j, g] = x[l, j, g] wherever gpu(i) = g, so the
same-gpu pairs are linear in layer l's own x: sum_eg a[e, g] x[e, g] with a from `affinity`. A block
re-places the experts that sit on a set of gpus among those gpus (all gpus: the whole layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from . import baselines
from .metrics import cross_fractions, load_ratios, objective_of
from .trace import RoutingTrace


@dataclass(frozen=True)
class Problem:
    """The trace, normalised: loads in units of the mean gpu load, transitions as fractions of their boundary."""

    load: np.ndarray  # [L, E], c[l, e] / mean_l
    frac: np.ndarray  # [L-1, E, E], t[l, i, j] / tot_l
    trace: RoutingTrace
    num_gpus: int
    comm_weight: float
    cap: np.ndarray  # [L], hard upper bound on each layer's max/mean load (inf: none)

    @classmethod
    def build(cls, trace: RoutingTrace, num_gpus: int, comm_weight: float,
              max_imbalance: float | None = None, balance_tolerance: float | None = None) -> Problem:
        """Normalise ``trace`` for ``num_gpus`` gpus. The per-layer load cap: ``max_imbalance`` (max/mean) if
        given, else balanced packing's max/mean + ``balance_tolerance`` (MoETuner's ILP 1: balance first),
        else none."""
        counts = trace.counts.astype(np.float64)
        mean = counts.sum(axis=1, keepdims=True) / num_gpus  # [L, 1]
        tot = trace.transitions.sum(axis=(1, 2)).astype(np.float64)[:, None, None]  # [L-1, 1, 1]
        load = counts / np.where(mean > 0, mean, 1.0)
        frac = trace.transitions / np.where(tot > 0, tot, 1.0)
        cap = np.full(len(load), np.inf)
        if max_imbalance is not None or balance_tolerance is not None:  # never below balanced packing: feasible
            packed = load_ratios(baselines.greedy(trace, num_gpus).to_array(), trace.counts, num_gpus) + 1e-9
            cap = np.maximum(max_imbalance, packed) if max_imbalance is not None else packed + balance_tolerance
        return cls(load, frac, trace, num_gpus, comm_weight, cap)

    def ratio(self, row: np.ndarray, layer: int) -> float:
        """Max/mean gpu load of ``layer`` placed as ``row`` ``[E]``."""
        return float(load_ratios(row[None], self.trace.counts[layer : layer + 1], self.num_gpus)[0])

    def within_cap(self, gpu_of: np.ndarray) -> bool:
        """Whether every layer keeps its max/mean load under its cap."""
        ratios = load_ratios(gpu_of, self.trace.counts, self.num_gpus)
        return bool(np.all(ratios <= self.cap + 1e-9))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, E, G)."""
        L, E = self.load.shape
        return L, E, self.num_gpus

    def total(self, gpu_of: np.ndarray) -> float:
        """The objective of a whole placement ``[L, E]``."""
        return objective_of(gpu_of, self.trace, self.num_gpus, self.comm_weight)

    def local(self, gpu_of: np.ndarray, layer: int, use_next: bool = True) -> float:
        """The part of the objective that depends on ``gpu_of[layer]`` (without the next boundary if not use_next)."""
        L = self.shape[0]
        lo, hi = max(layer - 1, 0), min(layer + 1, L - 1) if use_next else layer
        ratio = load_ratios(gpu_of[layer : layer + 1], self.trace.counts[layer : layer + 1], self.num_gpus)[0]
        cross = cross_fractions(gpu_of[lo : hi + 1], self.trace.transitions[lo:hi]).sum()
        return float(ratio + self.comm_weight * cross)


def highs(c, A, lb, ub, integrality, var_lb, var_ub, time_limit: float, mip_gap: float):
    """Run HiGHS on ``min c.v  s.t.  lb <= A v <= ub,  var_lb <= v <= var_ub``; return scipy's result."""
    return milp(c, integrality=integrality, bounds=Bounds(var_lb, var_ub),
                constraints=LinearConstraint(A, lb, ub),
                options={"time_limit": max(time_limit, 0.01), "mip_rel_gap": mip_gap, "disp": False})


# --- one layer given its neighbours -------------------------------------------------------------


def affinity(problem: Problem, gpu_of: np.ndarray, layer: int, use_prev: bool, use_next: bool) -> np.ndarray:
    """``a[e, g]``: share of the neighbouring boundaries' pairs that stay on-gpu if expert e goes to g."""
    L, E, G = problem.shape
    a = np.zeros((E, G))
    if use_prev and layer > 0:
        a += problem.frac[layer - 1].T @ np.eye(G)[gpu_of[layer - 1]]  # [E, E] @ [E, G]
    if use_next and layer < L - 1:
        a += problem.frac[layer] @ np.eye(G)[gpu_of[layer + 1]]
    return a


def solve_block(problem: Problem, gpu_of: np.ndarray, layer: int, a: np.ndarray, neighbours: int,
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
    sym = symmetry_ub(load[experts], H) if break_symmetry else np.ones(n)
    var_lb = np.concatenate([np.zeros(n), [others.max(), 1.0]])  # m >= load of every gpu left alone
    cap = max(problem.cap[layer], others.max())
    var_ub = np.concatenate([sym, [cap, 1.0]])  # m <= cap; the constant term's variable is fixed at 1
    integrality = np.concatenate([np.ones(n), [0, 0]])
    res = highs(c, A, lb, ub, integrality, var_lb, var_ub, time_limit, mip_gap)
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


def symmetry_ub(load: np.ndarray, G: int) -> np.ndarray:
    """Upper bounds ``[E*G]`` that let the r-th heaviest expert use only gpus 0..r."""
    rank = np.empty(load.shape[0], dtype=np.int64)
    rank[np.argsort(-load, kind="stable")] = np.arange(load.shape[0])
    return (np.arange(G)[None, :] <= rank[:, None]).astype(np.float64).ravel()  # [E, G] -> [E*G]


# --- joint MILP ---------------------------------------------------------------------------------


def _pairs(problem: Problem) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nonzero transitions ``(i, j)`` per boundary: only those get y variables."""
    return [np.nonzero(f) for f in problem.frac]


def joint_size(problem: Problem) -> int:
    """Number of x and y variables of the joint MILP."""
    L, E, G = problem.shape
    return L * E * G + G * sum(len(i) for i, _ in _pairs(problem))


def solve_joint(problem: Problem, cutoff: float | None, time_limit: float,
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
    var_ub = np.concatenate([np.ones(nx), np.ones(m_col - nx), problem.cap, [1.0]])
    var_ub[: E * G] = symmetry_ub(problem.load[0], G)
    res = highs(c, A, np.concatenate(lb), np.concatenate(ub), integrality, var_lb, var_ub, time_limit, mip_gap)
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
