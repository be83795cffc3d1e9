"""Expert parallelism for a DualSparse model: shard the sub-experts, send each kept (token, expert) row once.

Calibrate and sparsify on one process, then call `shard_sparse` on every rank (with the same placement).
The source rank decides which sub-expert computations run (as on one process) and sends each
(token, expert) pair with at least one kept part through the plain `EPDispatcher`, its P keep bits packed
as extra columns; the owning rank expands each row into its kept sub-expert rows for the grouped GEMM and
sums the parts back before the return all-to-all. So the wire carries what plain EP carries (less: pairs
with every part dropped stay home). With load-aware dropping each source rank levels the ranks' kept work
from its own routed counts (no extra communication).
Notation: T = tokens, k = choices, E = experts (E_l local), P = parts, M = pairs sent, R = rows received.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.inference.dropping import DualSparseDispatcher, ThenHandle, scatter_sum
from moestack.inference.dualsparse import dispatchers, moe_layers
from moestack.moe.dispatch import Dispatched
from moestack.moe.router import Routing
from moestack.parallel.ep import EPDispatcher, global_stats, shard_experts
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement


class EPDualSparseDispatcher(DualSparseDispatcher):
    """DualSparse dropping over an `EPDispatcher` (`inner`, over the E experts)."""

    def __init__(self, num_experts: int, parts: int, inner: EPDispatcher):
        super().__init__(num_experts, parts)
        self.inner = inner

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """Send every (token, expert) pair with a kept part, keep bits attached; wait() gives sub-expert rows."""
        # x: [T, D]
        T, k = routing.expert_ids.shape
        kept, _ = self.kept_choices(routing)
        bits = x.new_zeros(T * k * self.parts).index_fill_(0, kept, 1).view(T * k, self.parts)  # [T*k, P]
        pairs = (bits.sum(dim=-1) > 0).nonzero().squeeze(1)  # [M] (token, choice) pairs with work left
        ids = routing.expert_ids.flatten()[pairs]  # [M]
        pseudo = Routing(ids.unsqueeze(1), routing.weights.flatten()[pairs].unsqueeze(1),
                         torch.bincount(ids, minlength=self.num_experts), routing.aux_loss, routing.z_loss)
        rows = torch.cat([x[pairs // k], bits[pairs]], dim=-1)  # [M, D + P]: the keep bits ride along
        tokens = pairs // k
        return ThenHandle(self.inner.dispatch(rows, pseudo), lambda d: self._expand(d, tokens, T))

    def _expand(self, d: Dispatched, tokens: torch.Tensor, T: int) -> Dispatched:
        """Received rows [R, D + P] grouped by local expert -> kept sub-expert rows grouped by sub-expert."""
        P = self.parts
        D = d.x.shape[-1] - P
        slot = torch.repeat_interleave(torch.arange(d.counts.numel(), device=d.x.device), d.counts)  # [R]
        row, part = (d.x[:, D:] > 0.5).nonzero(as_tuple=True)  # kept (row, part) pairs
        sub = slot[row] * P + part
        order = torch.argsort(sub, stable=True)
        counts = torch.bincount(sub, minlength=d.counts.numel() * P)  # [E_l * P]
        row = row[order]
        return Dispatched(d.x[row, :D], counts, row, d.num_choices, d.weights, 0, {"dualsparse": (d, row, tokens, T)})

    def combine(self, y: torch.Tensor, d: Dispatched):
        """Sum the parts per received row, send the rows back, sum them into their tokens: [T, D]."""
        # y: [N, D] sub-expert outputs
        received, row, tokens, T = d.extra["dualsparse"]
        rows = y.new_zeros(received.x.shape[0], y.shape[-1]).index_add_(0, row, y)  # parts summed per row: [R, D]
        return ThenHandle(self.inner.combine(rows, received), lambda out: scatter_sum(out, tokens, T))


def shard_sparse(model: nn.Module, ctx: ParallelContext, placement: Placement | None = None) -> nn.Module:
    """Shard every DualSparse layer of `model` over ctx's ep group (placement: contiguous by default)."""
    layers = moe_layers(model)
    dispatchers(model)  # raises unless the model is sparsified
    placement = placement or Placement.contiguous(len(layers), layers[0].num_experts, ctx.ep)
    for idx, layer in enumerate(layers):
        old, E = layer.dispatcher, layer.num_experts
        row = list(placement.expert_to_gpu[idx])
        mine = placement.experts_on(idx, ctx.ep_rank)
        slots = [placement.slot_of(idx, e)[1] for e in range(E)]
        shard_experts(layer.experts, [g * old.parts + p for g in mine for p in range(old.parts)])
        disp = EPDualSparseDispatcher(E, old.parts, EPDispatcher(ctx.ep_group, row, slots, len(mine)))
        disp.load_state_dict(old.state_dict())
        disp.to(old.scale.device).set_ranks(row)
        disp.set_policy(old.drop_rate, old.load_aware, old.max_rank_rate)
        layer.dispatcher = disp
        layer.router.reduce_stats = global_stats(ctx.stats_group)
    return model
