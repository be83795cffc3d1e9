"""DualSparse dynamic tensor-level dropping: a dispatcher that sends each kept (token, expert, part) to its sub-expert.

It replaces an MoE layer's dispatcher once the layer's experts are split into E*P sub-experts
(`partition.sub_experts`). For every token-choice it estimates each sub-expert's contribution as
`routing weight x scale[e, p]` (scale: the sub-expert's calibrated output size per unit weight) and skips
the sub-expert computations scoring lowest. Skipped rows are removed before the grouped GEMM, so the work
really is not done. Uniform dropping uses one static threshold: the calibration score distribution's
(`table`) quantile at the target rate. Load-aware dropping gives each EP rank its own rate from this
batch's per-rank loads (`load_aware_rates`) and drops exactly that fraction of the rank's lowest scores in
this batch (a per-rank batch quantile: skewed loads also skew the scores, so a calibrated table would miss).
Notation: T = tokens, k = choices per token, E = experts, P = parts, G = EP ranks, N = kept rows, D = hidden.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.moe.dispatch import Dispatched, Done
from moestack.moe.router import Routing

TABLE_SIZE = 1025  # points of the calibration score distribution kept per layer


def quantile_table(scores: torch.Tensor, size: int = TABLE_SIZE) -> torch.Tensor:
    """`size` evenly spaced quantiles (0 .. 1) of the scores: [size] ascending."""
    s = scores.flatten().float().sort().values
    idx = (torch.linspace(0, 1, size, device=s.device) * (s.numel() - 1)).round().long()
    return s[idx]


def threshold_at(table: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Score thresholds dropping a fraction `rates` of the table's distribution; -inf where the rate is 0."""
    table = table.float()
    pos = rates.float().clamp(0, 1) * (table.numel() - 1)
    lo = pos.floor().long().clamp(max=table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    tau = table[lo] + (pos - lo) * (table[hi] - table[lo])
    return torch.where(rates > 0, tau, torch.full_like(tau, float("-inf")))


def load_aware_rates(loads: torch.Tensor, drop_rate: float, max_rate: float) -> torch.Tensor:
    """Per-rank drop rates [G] that drop `drop_rate` of all work while levelling the ranks' kept work.

    Water-filling: rank r keeps min(load_r, C), but at least load_r * (1 - max_rate); C is chosen so the
    kept total is (1 - drop_rate) of the load. So only the most loaded ranks drop, down to a common level.
    """
    L = loads.double()  # [G]
    cap = max(float(max_rate), float(drop_rate))
    lo, hi = L * (1 - cap), L
    target = (1 - drop_rate) * L.sum()
    cands = torch.cat([lo, hi]).sort().values  # [2G] breakpoints of the piecewise-linear kept(C)
    kept_at = torch.minimum(torch.maximum(cands[:, None], lo), hi).sum(dim=1)  # [2G], nondecreasing
    i = torch.searchsorted(kept_at, target.reshape(1)).clamp(1, cands.numel() - 1)[0]
    slope = (kept_at[i] - kept_at[i - 1]).clamp_min(1e-12)
    level = cands[i - 1] + (target - kept_at[i - 1]) * (cands[i] - cands[i - 1]) / slope
    kept = torch.minimum(torch.maximum(level, lo), hi)  # [G]
    rates = torch.where(L > 0, 1 - kept / L.clamp_min(1e-12), torch.full_like(L, drop_rate))
    return rates.to(loads.dtype if loads.is_floating_point() else torch.float32)


def keep_top_per_group(score: torch.Tensor, group: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Drop the lowest-scoring fraction `rates[g]` of each group's entries: keep mask [M] (score, group: [M])."""
    order = score.argsort()
    order = order[group[order].argsort(stable=True)]  # grouped, ascending score within a group
    sizes = torch.bincount(group, minlength=rates.numel())  # [G]
    starts = torch.cumsum(sizes, 0) - sizes
    n_drop = (rates.double() * sizes).round().long()  # [G]
    g = group[order]
    dropped = torch.arange(score.numel(), device=score.device) - starts[g] < n_drop[g]  # [M] in sorted order
    return torch.empty_like(dropped).scatter_(0, order, ~dropped)


class ThenHandle:
    """A handle applying `fn` to another handle's result (once)."""

    def __init__(self, handle, fn):
        self.handle, self.fn, self.value, self.done = handle, fn, None, False

    def wait(self):
        if not self.done:
            self.value, self.done = self.fn(self.handle.wait()), True
        return self.value


class DualSparseDispatcher(nn.Module):
    """Dispatch to E*P sub-experts, skipping low-contribution ones; the layer's `dispatcher` after sparsify.

    Single process; `moestack.inference.ep.EPDualSparseDispatcher` is the expert-parallel one.
    """

    def __init__(self, num_experts: int, parts: int):
        super().__init__()
        self.num_experts, self.parts = num_experts, parts
        self.register_buffer("scale", torch.ones(num_experts, parts))  # [E, P] output size per unit weight
        self.register_buffer("table", torch.zeros(TABLE_SIZE))  # calibration score quantiles
        self.register_buffer("expert_rank", torch.zeros(num_experts, dtype=torch.int64))  # [E] EP rank
        self.drop_rate, self.load_aware, self.num_ranks, self.max_rank_rate = 0.0, False, 1, 1.0
        self.skipped = self.total = 0
        self.last_counts: torch.Tensor | None = None  # [E*P] kept rows per sub-expert, last forward

    def set_ranks(self, expert_rank: list[int]) -> None:
        """The EP rank of each global expert (a placement row), for load-aware dropping."""
        self.expert_rank.copy_(torch.as_tensor(expert_rank, dtype=torch.int64))
        self.num_ranks = max(expert_rank) + 1

    def set_policy(self, drop_rate: float, load_aware: bool = False, max_rank_rate: float | None = None) -> None:
        """Target fraction of sub-expert computations to skip; load-aware: per-rank rates from the loads."""
        self.drop_rate, self.load_aware = float(drop_rate), bool(load_aware)
        default = (self.parts - 1) / self.parts if self.parts > 1 else 1.0
        self.max_rank_rate = max(float(drop_rate), default if max_rank_rate is None else float(max_rank_rate))

    def rank_rates(self, counts: torch.Tensor) -> torch.Tensor:
        """Drop rate of each EP rank [G] for this batch (uniform, or load-aware from the routed counts [E])."""
        if not self.load_aware:
            return torch.full((self.num_ranks,), self.drop_rate, device=counts.device)
        loads = torch.zeros(self.num_ranks, device=counts.device).index_add_(0, self.expert_rank, counts.float())
        return load_aware_rates(loads, self.drop_rate, self.max_rank_rate)

    def keep(self, routing: Routing) -> torch.Tensor | None:
        """Which sub-expert computations to run: [T*k*P] bool, or None for all of them."""
        if self.drop_rate <= 0:
            return None
        ids = routing.expert_ids  # [T, k]
        score = (routing.weights.unsqueeze(-1) * self.scale[ids]).flatten()  # [T*k*P]
        if not self.load_aware:  # one static threshold, calibrated to the target rate
            rate = torch.tensor([self.drop_rate], device=score.device)
            return score >= threshold_at(self.table, rate)
        rank = self.expert_rank[ids].unsqueeze(-1).expand(*ids.shape, self.parts).flatten()  # [T*k*P]
        return keep_top_per_group(score, rank, self.rank_rates(routing.counts))

    def kept_choices(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices into the T*k*P sub-choices that run [N], their sub-expert ids [N]); records the stats."""
        T, k = routing.expert_ids.shape
        P = self.parts
        sub = (routing.expert_ids.unsqueeze(-1) * P + torch.arange(P, device=routing.expert_ids.device)).flatten()
        keep = self.keep(routing)
        kept = torch.arange(T * k * P, device=sub.device) if keep is None else keep.nonzero().squeeze(1)
        self.total += T * k * P
        self.skipped += T * k * P - kept.numel()
        self.last_counts = torch.bincount(sub[kept], minlength=self.num_experts * P)  # [E*P]
        return kept, sub[kept]

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """Kept sub-choices' rows in sub-expert order (a done handle), like LocalDispatcher over E*P experts."""
        # x: [T, D]
        T, k = routing.expert_ids.shape
        kept, sub = self.kept_choices(routing)  # [N], [N]
        order = kept[torch.argsort(sub, stable=True)]  # [N] sub-choices in sub-expert order
        x_sorted = x[order // (k * self.parts)]  # [N, D]: only kept rows reach the grouped GEMM
        return Done(Dispatched(x_sorted, self.last_counts, order, T * k * self.parts, routing.weights))

    def combine(self, y: torch.Tensor, d: Dispatched):
        """Each token's sum of its kept sub-expert outputs times their expert's gate value: [T, D]."""
        # y: [N, D] sub-expert outputs in dispatch order
        T, k = d.weights.shape
        w = d.weights.unsqueeze(-1).expand(T, k, self.parts).reshape(-1)[d.order]  # [N] the expert's gate value
        return Done(scatter_sum(y * w.unsqueeze(-1).to(y.dtype), d.order // (k * self.parts), T))

    def achieved_rate(self) -> float:
        """Fraction of sub-expert computations skipped since the last reset."""
        return self.skipped / self.total if self.total else 0.0

    def reset_stats(self) -> None:
        """Zero the skipped/total counters."""
        self.skipped = self.total = 0


def scatter_sum(rows: torch.Tensor, tokens: torch.Tensor, T: int) -> torch.Tensor:
    """Sum rows [N, D] into their tokens: [T, D]."""
    return rows.new_zeros(T, rows.shape[-1]).index_add_(0, tokens, rows)
