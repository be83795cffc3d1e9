"""Expert parallelism for a DualSparse model: shard the experts, send each kept (token, expert) row once.

Calibrate and sparsify on one process, then call `shard_sparse` on every rank (with the same placement).
The source rank decides how many parts each choice runs (as on one process) and sends each
(token, expert) pair with at least one kept part through the plain `EPDispatcher`, its part count as an
extra column; the owning rank sorts the rows by (parts, expert) for `PartExperts` and restores the
received order before the return all-to-all. So the wire carries what plain EP carries (less: pairs
with every part dropped stay home). With load-aware dropping the ranks first sum their routed counts (one
all-reduce of E numbers per layer), so every source rank computes the same per-rank rates from the global
loads, as one process does on the whole batch; each source then drops that rate of its own lowest-scoring
computations bound for each rank, so each rank's kept work is the single-process level (up to rounding).
Notation: T = tokens, k = choices, E = experts (E_l local), P = parts, M = pairs sent, R = rows received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moestack.inference.dropping import DualSparseDispatcher, ThenHandle, sort_by_parts
from moestack.inference.dualsparse import dispatchers, moe_layers
from moestack.moe.dispatch import Dispatched, unpermute
from moestack.moe.router import Routing, count_ids
from moestack.parallel.ep import EPDispatcher, check_placement, shard_layer
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement


class EPDualSparseDispatcher(DualSparseDispatcher):
    """DualSparse dropping over an `EPDispatcher` (`inner`, over the E experts)."""

    fused_parts = None  # rows cross ranks: the single-process fused kernels do not apply

    def __init__(self, num_experts: int, parts: int, inner: EPDispatcher):
        super().__init__(num_experts, parts)
        self.inner = inner

    def rank_rates(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-rank drop rates [G] from the loads summed over the EP group (counts: this rank's [E])."""
        if self.load_aware:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.inner.group)
        return super().rank_rates(counts)

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """Send every choice with work left once, its part count attached; wait() gives rows for PartExperts."""
        # x: [T, D]
        T, k = routing.expert_ids.shape
        j = self.parts_to_run(routing).flatten()  # [T*k]
        pairs = (j > 0).nonzero().squeeze(1)  # [M] choices with work left
        self.record(j)
        ids = routing.expert_ids.flatten()[pairs]  # [M]
        ones = torch.ones(pairs.numel(), 1, device=x.device)  # the gate weights are applied at home, below
        pseudo = Routing(ids.unsqueeze(1), ones, count_ids(ids, self.num_experts),
                         routing.aux_loss, routing.z_loss)
        rows = torch.cat([x[pairs // k], j[pairs].unsqueeze(1).to(x.dtype)], dim=-1)  # [M, D + 1]
        home = {"pairs": pairs, "weights": routing.weights, "choices": T * k}
        return ThenHandle(self.inner.dispatch(rows, pseudo), lambda d: self._sort(d, home))

    def _sort(self, d: Dispatched, home: dict) -> Dispatched:
        """Received rows [R, D + 1] grouped by local expert -> rows with work sorted by (parts, expert)."""
        D = d.x.shape[-1] - 1
        slot = torch.repeat_interleave(torch.arange(d.counts.numel(), device=d.x.device), d.counts)  # [R]
        order, counts = sort_by_parts(d.x[:, D].round().long(), slot, d.counts.numel(), self.parts)
        self.last_counts = counts
        return Dispatched(d.x[order, :D], counts, order, d.num_choices, d.weights, 0,
                          {"dualsparse": (d, order, home)})

    def combine(self, y: torch.Tensor, d: Dispatched):
        """Rows back into received order, home by all-to-all, then summed into their tokens: [T, D]."""
        # y: [R, D] in (parts, expert) order; every received row has work, so the order is a permutation
        received, order, home = d.extra["dualsparse"]
        rows = y.new_empty(received.x.shape[0], y.shape[-1]).index_copy_(0, order, y)  # [R, D]
        pairs, weights, choices = home["pairs"], home["weights"], home["choices"]
        return ThenHandle(self.inner.combine(rows, received),
                          lambda out: unpermute(out, pairs, weights, choices))


def shard_sparse(model: nn.Module, ctx: ParallelContext, placement: Placement | None = None) -> nn.Module:
    """Shard every DualSparse layer of `model` over ctx's ep group (placement: contiguous by default)."""
    layers = moe_layers(model)
    dispatchers(model)  # raises unless the model is sparsified
    E = layers[0].num_experts
    if placement is None:
        placement = Placement.contiguous(len(layers), E, ctx.ep)
    check_placement(placement, len(layers), E, ctx.ep, placement.source)
    for idx, layer in enumerate(layers):
        old = layer.dispatcher
        disp = EPDualSparseDispatcher(E, old.parts, shard_layer(layer, ctx, placement, idx))
        disp.load_state_dict(old.state_dict())
        disp.to(old.scale.device).set_ranks(list(placement.expert_to_gpu[idx]))
        disp.set_policy(old.drop_rate, old.load_aware, old.max_rank_rate)
        layer.dispatcher = disp
    return model
