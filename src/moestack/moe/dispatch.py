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

from moestack.moe.experts import fused_inference, triton_runs
from moestack.moe.router import Routing, count_ids

# The training combine and the expansion's backward as Triton kernels where Triton runs, outside torch.compile
# (False: the autograd gathers and sums; benchmarks flip it to compare both in one run)
TRITON_COMBINE = [True]


def _triton_combine(t: torch.Tensor) -> bool:
    return TRITON_COMBINE[0] and not torch.compiler.is_compiling() and triton_runs(t)


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
    inverse: torch.Tensor | None = None  # [T*k] row of each choice in x (0 where not sent), see `inverse_order`
    sent: torch.Tensor | None = None  # [T*k] bool, which choices have a row; None when all have one


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
    counts = count_ids(flat, num_experts)
    return order, counts


def capacity_keep(sorted_ids: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """Mask over expert-sorted choices: True for the first `capacity` choices of each expert."""
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.arange(sorted_ids.numel(), device=sorted_ids.device) - starts[sorted_ids]
    return pos < capacity


def inverse_order(order: torch.Tensor, num_choices: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(row of each choice [T*k], 0 where the choice has none; which choices have a row [T*k] or None if all)."""
    n = order.numel()
    inverse = order.new_zeros(num_choices).scatter_(0, order, torch.arange(n, device=order.device))
    if n == num_choices:
        return inverse, None
    return inverse, torch.zeros(num_choices, dtype=torch.bool, device=order.device).index_fill_(0, order, True)


class _GatherRows(torch.autograd.Function):
    """x[index] whose backward gathers too: grad_x = grad[back]. Exact when source row i feeds only row
    back[i] of the output, or when every other output row that reads it gets a zero gradient."""

    @staticmethod
    def forward(ctx, x, index, back):
        ctx.save_for_backward(back)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return grad.index_select(0, back), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """Rows x[index]; `back` sends gradients home by a gather (no atomics): see `_GatherRows`."""
    return _GatherRows.apply(x, index, back)


class _ExpandRows(torch.autograd.Function):
    """Token rows copied to their sent choices: x [T, D] -> [N, D]; backward sums each token's k copies."""

    @staticmethod
    def forward(ctx, x, order, inverse, sent, k):
        ctx.save_for_backward(inverse, sent)
        ctx.k = k
        # decided here, not in backward: the backward runs after whatever switched TRITON_COMBINE is undone
        ctx.triton = sent is None and order.numel() == inverse.numel() and _triton_combine(x)
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        inverse, sent = ctx.saved_tensors
        k = ctx.k
        if ctx.triton:  # every choice has a row: one kernel sums each token's k row gradients
            from moestack.moe.rows_triton import combine_segments

            ones = torch.ones(inverse.numel() // k, k, device=grad.device)
            return combine_segments([grad], inverse, ones), None, None, None, None
        per_choice = grad.index_select(0, inverse)  # [T*k, D]
        if sent is not None:  # unsent choices read another row's gradient: zero it (where: inf * 0 is nan)
            per_choice = torch.where(sent.unsqueeze(-1), per_choice, per_choice.new_zeros(()))
        return per_choice.view(-1, k, grad.shape[-1]).sum(dim=1), None, None, None, None


def expand_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, sent: torch.Tensor | None,
                k: int) -> torch.Tensor:
    """x[order // k] for choices `order` (see `inverse_order`); the gradient is a gather and a sum."""
    return _ExpandRows.apply(x, order, inverse, sent, k)


class _CombineRows(torch.autograd.Function):
    """sum_k weights[t, k] * y[inverse[t * k + k']] (every choice with a row) as Triton kernels, forward and
    backward: one pass over y each way, no [T*k, D] intermediate in choice order (moe/rows_triton.py)."""

    @staticmethod
    def forward(ctx, y, inverse, weights):
        from moestack.moe.rows_triton import combine_segments

        # y is needed only for the weights' gradient (a frozen router keeps no [N, D] activation alive)
        ctx.save_for_backward(y if ctx.needs_input_grad[2] else None, inverse, weights)
        return combine_segments([y], inverse, weights)

    @staticmethod
    def backward(ctx, grad):
        from moestack.moe.rows_triton import combine_backward

        y, inverse, weights = ctx.saved_tensors
        gy, gw = combine_backward(y, grad, inverse, weights)  # gw None without y (no weights' gradient wanted)
        return gy, None, gw


def unpermute(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_choices: int,
              inverse: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each token's expert outputs with its weights: y [N, D] rows of choices `order` -> [T, D].

    Choices without a row count as zero (`sent` False). y may hold fewer rows than `order` when the
    choices after its first N rows have none (DualSparse's dropped choices sort last). One gather into
    token order and one weighted sum per token (a batched [1, k] x [k, D] product, or multiply-and-sum
    at k <= 4); no zero-filled scatter buffer and no atomics, forward or backward.
    """
    T, k = weights.shape
    N = y.shape[0]
    if N == 0:  # still a function of y: under EP the backward must reach the all-to-alls on every rank
        return y.new_zeros(T, y.shape[-1]) + y.sum() * 0
    if inverse is None:
        inverse, sent = inverse_order(order, num_choices)
    if N < order.numel():
        if sent is None:
            raise ValueError("unpermute: y has fewer rows than `order` but no `sent` mask says which choices lack one")
        inverse, order = inverse.clamp(max=N - 1), order[:N]
    elif sent is None and N == num_choices == weights.numel() and _triton_combine(y):  # dropless, CUDA: the kernels
        # (inverse is then a permutation of y's rows: the backward writes each row of grad_y exactly once)
        return _CombineRows.apply(y, inverse, weights)
    return weighted_sum(gather_rows(y, inverse, order), weights, sent)


def weighted_sum(per_choice: torch.Tensor, weights: torch.Tensor, sent: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * per_choice[t * k + k'] -> [T, D] (per_choice [T*k, D] in choice order).

    sent [T*k] bool: choices without a row; their per_choice rows may hold anything and count as zero.
    """
    T, k = weights.shape
    per_choice = per_choice.view(T, k, per_choice.shape[-1])  # [T, k, D]; T may be 0
    if sent is not None:  # unsent choices read some other row: zero it (where, not a multiply: inf * 0 is nan)
        mask = sent.view(T, k)
        weights = weights * mask
        per_choice = torch.where(mask.unsqueeze(-1), per_choice, per_choice.new_zeros(()))
    w = weights.to(per_choice.dtype)
    if k <= 4:  # bmm's backward is slow on thin products (bench/combine.py, H200: 2.4x at k = 2, 1.7x at k = 4)
        return (per_choice * w.unsqueeze(-1)).sum(dim=1)
    return torch.bmm(w.unsqueeze(1), per_choice).squeeze(1)  # faster at k = 8, forward and backward


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
        inverse, sent = inverse_order(order, T * k)
        x_sorted = expand_rows(x, order, inverse, sent, k)  # [N, D]
        return Done(Dispatched(x_sorted, counts, order, T * k, weights, dropped, inverse=inverse, sent=sent))

    def fused_parts(self, routing: Routing):
        """For `MoELayer.fused`: (parts per expert, parts each choice runs or None for all); None when this
        dispatcher's semantics (a capacity factor) need the sorted path."""
        return None if self.capacity_factor > 0 else (1, None)

    def combine(self, y: torch.Tensor, d: Dispatched) -> Done:
        # y: [N, D] expert outputs in dispatch order
        if d.sent is None and fused_inference(y, d.weights):  # inference, dropless: one kernel reads each row once
            from moestack.moe.rows_triton import combine_segments

            return Done(combine_segments([y], d.inverse, d.weights))
        return Done(unpermute(y, d.order, d.weights, d.num_choices, d.inverse, d.sent))
