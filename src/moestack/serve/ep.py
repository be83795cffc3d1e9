"""Expert-parallel serving: data-parallel attention, expert-parallel MoE, engine loops in lock-step.

Under torchrun every rank builds the same `LLM`; `shard_for_serving` keeps this rank's experts of every MoE
layer (placement files as in training, `parallel/ep.py`) and gives each layer an `EPDispatcher`. Each rank
owns its requests and their KV blocks (attention is data parallel); the MoE all-to-alls of one engine step
are collectives over the EP group, so every rank runs exactly one model forward per step: a rank with no
work runs an idle one-token forward on the scratch KV block (`ModelRunner.idle`), as vLLM's DP ranks run
dummy batches. `LLM.generate` under EP serves prompts[r::G] on rank r and gathers the completions, so
every rank returns the whole list in order. That is the home flow: each token's hidden state returns to its
rank after every MoE layer. `flow="follow"` (serve/follow.py) keeps the state on its first choice's rank
instead, with the KV cache replicated and every rank running every request.
The engine counts the bytes each rank sends to each rank (`traffic`), from the exchanges themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moestack.parallel.ep import EPDispatcher, check_placement, load_placement, shard_layer
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement


FLOWS = ("home", "follow")


def shard_for_serving(model, ctx: ParallelContext, placement: str | Placement | None = None,
                      flow: str = "home") -> list[EPDispatcher]:
    """Keep this rank's experts of each MoE layer of a ServeModel; returns the layers' dispatchers. flow:
    "home" or "follow" (the model's forward then runs serve/follow.py's flow)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("expert-parallel serving needs an MoE model; this one has no MoE layers")
    if flow == "follow" and model.spec.scmoe:
        raise ValueError("ep_flow='follow' runs standard MoE blocks; ScMoE models serve with ep_flow='home'")
    if any(getattr(layer.dispatcher, "capacity_factor", 0) > 0 for layer in layers):
        raise ValueError("this model drops tokens over an expert capacity (moe.capacity_factor > 0), which expert "
                         "parallelism does not; serve it in one process, without torchrun")
    E = layers[0].num_experts
    if E % ctx.ep:
        raise ValueError(f"{ctx.ep} EP ranks do not divide the model's {E} experts; run a world size that divides "
                         f"{E} (torchrun --nproc_per_node N)")
    if isinstance(placement, Placement):
        plan = check_placement(placement, len(layers), E, ctx.ep, "the placement")
    else:
        plan = load_placement(placement or "", len(layers), E, ctx.ep)
    out = []
    for i, layer in enumerate(layers):
        layer.dispatcher = shard_layer(layer, ctx, plan, i)
        layer.dispatcher.count_traffic(layer.experts.d_model)
        out.append(layer.dispatcher)
    if flow == "follow":
        from moestack.serve.follow import FollowFlow

        model.flow = FollowFlow(model, ctx, out)
    return out


def any_rank(flags: list[bool], ctx: ParallelContext) -> list[bool]:
    """For each flag, whether it holds on some rank of the EP group (one all-reduce)."""
    t = torch.tensor([int(f) for f in flags], device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.ep_group)
    return [bool(v) for v in t.tolist()]


def min_over_ranks(value: int, ctx: ParallelContext) -> int:
    """The smallest of every rank's value."""
    t = torch.tensor([value], device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.ep_group)
    return int(t.item())


def same_on_all_ranks(value: int, ctx: ParallelContext) -> bool:
    """Whether every rank of the EP group holds this value (one all-reduce)."""
    t = torch.tensor([value, -value], dtype=torch.int64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.ep_group)
    return int(t[0]) == -int(t[1])


def gather_objects(obj, ctx: ParallelContext) -> list:
    """obj from every rank of the EP group, in rank order."""
    out = [None] * ctx.ep
    dist.all_gather_object(out, obj, group=ctx.ep_group)
    return out


def traffic(model, dispatchers: list[EPDispatcher], ctx: ParallelContext, reset: bool = True) -> dict[str, torch.Tensor]:
    """Bytes sent since the last reset, int64, [..., from, to] (every rank gets every matrix; bytes a rank
    keeps for itself are on the diagonal): "moe" [L_moe, G, G] the MoE layers' token rows, "kv" [blocks, G, G]
    the keys and values replicated under the follow flow, "sample" [G, G] the sampled rows it sends to every
    rank (both zero under home)."""
    flow = model.flow
    G = ctx.ep
    mine = {"moe": torch.stack([d.sent_bytes for d in dispatchers]),  # [L, G] this rank -> each rank
            "kv": flow.kv_bytes.clone() if flow else torch.zeros(len(model.blocks), G, dtype=torch.int64),
            "sample": flow.sample_bytes.clone() if flow else torch.zeros(G, dtype=torch.int64)}
    if reset:
        for d in dispatchers:
            d.reset_traffic()
        if flow:
            flow.reset_traffic()
    parts = gather_objects({k: v.cpu() for k, v in mine.items()}, ctx)
    return {k: torch.stack([p[k] for p in parts], dim=-2) for k in mine}


def _comm_device(ctx: ParallelContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
