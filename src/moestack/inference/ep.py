"""Expert parallelism for a DualSparse model: shard the sub-experts, send only kept rows.

Calibrate and sparsify on one process, then call `shard_sparse` on every rank (with the same
placement): each rank keeps the P sub-experts of its experts and the DualSparse dispatcher sends the kept
(token, sub-expert) rows through an `EPDispatcher` over the E*P sub-experts. With load-aware dropping each
source rank levels the ranks' kept work from its own routed counts (no extra communication).
Notation: E = experts, P = parts, G = EP ranks.
"""

from __future__ import annotations

import torch.nn as nn

from moestack.inference.dualsparse import dispatchers, moe_layers
from moestack.parallel.ep import EPDispatcher, global_stats, shard_experts
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement


def sub_expert_placement(expert_rank: list[int], expert_slot: list[int], parts: int) -> tuple[list[int], list[int]]:
    """Rank and local slot of each sub-expert e*P + p: the rank of e, slot slot(e)*P + p."""
    ranks = [r for r in expert_rank for _ in range(parts)]
    slots = [s * parts + p for s in expert_slot for p in range(parts)]
    return ranks, slots


def shard_sparse(model: nn.Module, ctx: ParallelContext, placement: Placement | None = None) -> nn.Module:
    """Shard every DualSparse layer of `model` over ctx's ep group (placement: contiguous by default)."""
    layers = moe_layers(model)
    dispatchers(model)  # raises unless the model is sparsified
    placement = placement or Placement.contiguous(len(layers), layers[0].num_experts, ctx.ep)
    for idx, layer in enumerate(layers):
        disp, E = layer.dispatcher, layer.num_experts
        row = list(placement.expert_to_gpu[idx])
        mine = placement.experts_on(idx, ctx.ep_rank)
        slots = [placement.slot_of(idx, e)[1] for e in range(E)]
        shard_experts(layer.experts, [g * disp.parts + p for g in mine for p in range(disp.parts)])
        ranks, sub_slots = sub_expert_placement(row, slots, disp.parts)
        disp.inner = EPDispatcher(ctx.ep_group, ranks, sub_slots, len(mine) * disp.parts)
        disp.set_ranks(row)
        layer.router.reduce_stats = global_stats(ctx.stats_group)
    return model
