"""Dispatchers move token-choices to expert order and back.

Every dispatcher has the same two-phase interface so expert parallelism (parallel/ep.py) and ScMoE's
overlap can swap it in: `dispatch(x, routing)` returns a handle whose `wait()` gives a `Dispatched` (tokens in
local-expert order); `combine(y, dispatched)` returns a handle whose `wait()` gives the weighted sum per token.
The local dispatcher's handles are already done; it alone supports a capacity factor (parallel/ep.py's
EPDispatcher is dropless, and the config refuses capacity_factor > 0 with ep > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moestack.moe.router import Routing


@dataclass
class Dispatched:
    """Tokens in local-expert order, plus what `combine` needs to bring them back."""

    x: torch.Tensor  # [N, D] rows grouped by local expert
    counts: torch.Tensor  # [E_local] int64 rows per local expert
    order: torch.Tensor  # [N] index into the flattened [T*k] token-choices
    num_choices: int  # T * k
    weights: torch.Tensor  # [T, k] combine weights (zero where a choice was dropped)
    dropped: int = 0  # token-choices over capacity (0 when dropless)
    extra: dict = field(default_factory=dict)  # dispatcher-specific state (EP splits)


class Done:
    """A handle whose result is already there."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """Stable sort of the flattened token-choices by expert: (order [T*k], counts [E])."""
    flat = expert_ids.flatten()  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def capacity_keep(sorted_ids: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """Mask over expert-sorted choices: True for the first `capacity` choices of each expert."""
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.arange(sorted_ids.numel(), device=sorted_ids.device) - starts[sorted_ids]
    return pos < capacity


def unpermute(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_choices: int) -> torch.Tensor:
    """Put expert outputs back in token order and sum the k choices with their weights: [T, D]."""
    T, k = weights.shape
    full = y.new_zeros(num_choices, y.shape[-1])
    full = full.index_copy(0, order, y)  # [T*k, D]
    return (full.view(T, k, -1) * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


class LocalDispatcher:
    """Single-process dispatcher: sort token-choices by expert, optionally drop over capacity."""

    def __init__(self, num_experts: int, capacity_factor: float = 0.0):
        self.num_experts, self.capacity_factor = num_experts, capacity_factor

    def dispatch(self, x: torch.Tensor, routing: Routing) -> Done:
        # x: [T, D]
        T, k = routing.expert_ids.shape
        order, counts = sort_by_expert(routing.expert_ids, self.num_experts)
        weights, dropped = routing.weights, 0
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * T * k / self.num_experts)
            keep = capacity_keep(routing.expert_ids.flatten()[order], counts, capacity)
            dropped = int((~keep).sum())
            mask = torch.ones(T * k, dtype=torch.bool, device=x.device)
            mask[order[~keep]] = False
            weights = weights * mask.view(T, k)
            order, counts = order[keep], counts.clamp(max=capacity)
        x_sorted = x[order // k]  # [N, D]
        return Done(Dispatched(x_sorted, counts, order, T * k, weights, dropped))

    def combine(self, y: torch.Tensor, d: Dispatched) -> Done:
        # y: [N, D] expert outputs in dispatch order
        return Done(unpermute(y, d.order, d.weights, d.num_choices))
