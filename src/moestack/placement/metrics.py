"""How good a placement is for a trace: load balance, cross-GPU transitions, a modelled step time.

Notation: L layers, E experts, G gpus, k = top_k. ``gpu_of`` is a placement as an array [L, E].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .placement import Placement
from .trace import RoutingTrace


def gpu_loads(gpu_of: np.ndarray, counts: np.ndarray, num_gpus: int) -> np.ndarray:
    """Token-choices each gpu computes per layer ``[L, G]``."""
    L = counts.shape[0]
    loads = np.zeros((L, num_gpus), dtype=np.float64)
    for layer in range(L):
        np.add.at(loads[layer], gpu_of[layer], counts[layer])
    return loads


def load_ratios(gpu_of: np.ndarray, counts: np.ndarray, num_gpus: int) -> np.ndarray:
    """Max over mean gpu load per layer ``[L]`` (1.0 = perfectly balanced; empty layers count as 1)."""
    loads = gpu_loads(gpu_of, counts, num_gpus)  # [L, G]
    mean = loads.mean(axis=1)
    return np.where(mean > 0, loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def cross_fractions(gpu_of: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """Fraction of token-choice pairs whose two experts sit on different gpus, per boundary ``[L-1]``."""
    out = np.zeros(transitions.shape[0])
    for layer, t in enumerate(transitions):
        total = t.sum()
        same = gpu_of[layer][:, None] == gpu_of[layer + 1][None, :]  # [E, E]
        out[layer] = 0.0 if total == 0 else 1.0 - t[same].sum() / total
    return out


def objective(placement: Placement, trace: RoutingTrace, comm_weight: float) -> float:
    """The quantity the ILP minimises.

    ``sum_l max_g load[l, g] / mean_g load[l, g]  +  comm_weight * sum_l cross[l] / total[l]``:
    one term per layer for the straggler gpu and one per boundary for the share of token-choice
    pairs that change gpu. Both are dimensionless, so ``comm_weight`` trades one point of imbalance
    in one layer against one point of cross-gpu share at one boundary.
    """
    return objective_of(placement.to_array(), trace, placement.num_gpus, comm_weight)


def objective_of(gpu_of: np.ndarray, trace: RoutingTrace, num_gpus: int, comm_weight: float) -> float:
    """`objective` of a placement given as an array ``[L, E]`` of gpu ids."""
    balance = load_ratios(gpu_of, trace.counts, num_gpus).sum()
    return float(balance + comm_weight * cross_fractions(gpu_of, trace.transitions).sum())


@dataclass(frozen=True)
class CostModel:
    """A deliberately simple time model of the MoE part of a forward over the trace's tokens.

    Per layer: expert compute = (max over gpus of token-choices) * FLOPs per token-choice / gpu_flops.
    Per boundary l -> l+1: a pair (i, j) with i and j on different gpus moves 1/k of a hidden vector
    from gpu(i) to gpu(j) (k*k pairs per token stand for k transfers); the all-to-all takes
    max over gpus of max(bytes sent, bytes received) / link_bandwidth.
    Defaults: a Mixtral-8x7B-sized expert in bf16 on an H100-class GPU (400 TFLOP/s sustained) with
    150 GB/s per-gpu all-to-all bandwidth. The first dispatch and last combine are not modelled.
    """

    hidden_size: int = 4096
    ffn_size: int = 14336
    bytes_per_elem: int = 2
    gpu_flops: float = 4.0e14
    link_bandwidth: float = 1.5e11  # bytes/s per gpu, each direction

    def compute_s(self, token_choices: np.ndarray) -> np.ndarray:
        """Seconds to run SwiGLU experts (3 matmuls) over ``token_choices``."""
        return token_choices * 6.0 * self.hidden_size * self.ffn_size / self.gpu_flops

    def comm_s(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds to move ``tokens`` hidden vectors over one gpu's link."""
        return tokens * self.hidden_size * self.bytes_per_elem / self.link_bandwidth

    def comm_weight(self) -> float:
        """The ILP ``comm_weight`` under which its objective tracks this model's time.

        A layer costs ~ (T*k/G) * compute_s(1) * max/mean load, a boundary ~ (T*k/G) * comm_s(1) * cross
        share (cross tokens spread over the gpus), so the ratio of the two unit costs is the weight.
        """
        return float(self.comm_s(1.0) / self.compute_s(1.0))


def modelled_time_s(gpu_of: np.ndarray, trace: RoutingTrace, num_gpus: int, cost: CostModel) -> tuple[float, float]:
    """``(compute seconds, all-to-all seconds)`` of the MoE layers under `CostModel`."""
    compute = cost.compute_s(gpu_loads(gpu_of, trace.counts, num_gpus).max(axis=1)).sum()
    comm = 0.0
    for layer, t in enumerate(trace.transitions):
        onehot_a = np.eye(num_gpus)[gpu_of[layer]]  # [E, G]
        onehot_b = np.eye(num_gpus)[gpu_of[layer + 1]]  # [E, G]
        volume = onehot_a.T @ t @ onehot_b / trace.top_k  # [G, G] tokens from gpu g to gpu h
        np.fill_diagonal(volume, 0.0)
        comm += float(cost.comm_s(max(volume.sum(axis=1).max(), volume.sum(axis=0).max())))
    return float(compute), comm


def home_flow_time_s(gpu_of: np.ndarray, trace: RoutingTrace, num_gpus: int, cost: CostModel) -> float:
    """Seconds of the MoE layers under moestack's EP data flow: every layer sends each token-choice from the
    token's home rank to its expert's rank and back (attention is data parallel over the ranks; homes are
    spread evenly). Per layer: compute on the most loaded gpu, plus dispatch and combine, each bounded by
    the gpu that receives (or sends) the most remote rows. Only the per-gpu loads enter; the inter-layer
    transitions do not (a token never goes from one layer's expert to the next's directly).
    """
    loads = gpu_loads(gpu_of, trace.counts, num_gpus)  # [L, G] token-choices per gpu
    total = loads.sum(axis=1, keepdims=True)  # [L, 1]
    remote_in = loads * (num_gpus - 1) / num_gpus  # rows a gpu's experts get from the other homes
    remote_out = (total / num_gpus) - loads / num_gpus  # a home's rows bound for other gpus
    exchange = np.maximum(remote_in.max(axis=1), remote_out.max(axis=1))  # [L]
    return float((cost.compute_s(loads.max(axis=1)) + 2 * cost.comm_s(exchange)).sum())


@dataclass(frozen=True)
class PlacementMetrics:
    """Balance and traffic of one placement on one trace."""

    max_load_ratio: float  # worst layer's max/mean gpu load
    mean_load_ratio: float  # mean over layers of max/mean gpu load
    cross_fraction: float  # share of all token-choice pairs between consecutive layers that change gpu
    compute_ms: float
    comm_ms: float
    objective: float
    ep_ms: float  # `home_flow_time_s`: the same cost model under moestack's EP data flow

    @property
    def step_ms(self) -> float:
        """Modelled MoE time: compute plus inter-layer all-to-all."""
        return self.compute_ms + self.comm_ms


def evaluate(placement: Placement, trace: RoutingTrace, comm_weight: float = 1.0,
             cost: CostModel | None = None) -> PlacementMetrics:
    """Metrics of ``placement`` on ``trace`` (``comm_weight`` only enters the objective)."""
    gpu_of, G = placement.to_array(), placement.num_gpus
    ratios = load_ratios(gpu_of, trace.counts, G)
    total = trace.transitions.sum()
    cross = 0.0 if total == 0 else float((cross_fractions(gpu_of, trace.transitions) * trace.transitions.sum(axis=(1, 2))).sum() / total)
    cost = cost or CostModel()
    compute_s, comm_s = modelled_time_s(gpu_of, trace, G, cost)
    return PlacementMetrics(float(ratios.max()), float(ratios.mean()), cross, compute_s * 1e3, comm_s * 1e3,
                            objective(placement, trace, comm_weight), home_flow_time_s(gpu_of, trace, G, cost) * 1e3)


@dataclass
class PlanReport:
    """How a placement was found: method, objective, solve time and what the solver could prove."""

    method: str
    objective: float
    solve_time_s: float
    status: str = "heuristic"  # "optimal" (proven within mip_gap), "time_limit", "heuristic"
    mode: str = "baseline"  # "baseline", "joint" (one MILP) or "decomposed" (per-layer MILPs)
    warm_start: str | None = None  # baseline the ILP started from
    warm_objective: float | None = None
    mip_gap: float | None = None  # gap HiGHS reported for the joint MILP, if solved jointly
    subproblems: int = 0  # per-layer MILPs solved
    details: dict = field(default_factory=dict)
