"""Expert parallelism: experts sharded over the `ep` group, tokens moved by all-to-all.

`parallelize` wraps a model from outside: it keeps only this rank's experts (by a `Placement`), swaps
each MoE layer's dispatcher for an `EPDispatcher`, makes router statistics global, and wraps the
non-expert parameters in DDP over the whole world. Expert gradients (which every ep rank's loss reached)
are divided by ep and averaged over `dp` only.
Notation: T = tokens, k = choices per token, G = ep ranks, E_l = local experts, D = hidden size.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from moestack.moe.dispatch import Dispatched, expand_rows, gather_rows, inverse_order, sort_by_expert, unpermute
from moestack.moe.experts import GroupedExperts
from moestack.moe.router import Routing
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement, PlacementError


# ---- asynchronous, autograd-aware all-to-all ------------------------------------------------------
class _Pending:
    """The in-flight work of one all-to-all, shared by its start and wait autograd nodes."""

    def __init__(self, group, in_splits: list[int], out_splits: list[int]):
        self.group, self.in_splits, self.out_splits = group, in_splits, out_splits
        self.work = None
        self.grad_in: torch.Tensor | None = None  # set by _A2AWait.backward, read by _A2AStart.backward

    def launch(self, x: torch.Tensor, out_rows: int, in_splits, out_splits) -> torch.Tensor:
        out = x.new_empty(out_rows, *x.shape[1:])
        self.work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group, async_op=True)
        return out

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _A2AStart(torch.autograd.Function):
    """Launch the all-to-all; the output is valid only after the matching _A2AWait."""

    @staticmethod
    def forward(ctx, x, pending: _Pending):
        ctx.pending = pending
        return pending.launch(x, sum(pending.out_splits), pending.in_splits, pending.out_splits)

    @staticmethod
    def backward(ctx, grad):
        ctx.pending.wait()  # the reverse exchange launched by _A2AWait.backward
        return ctx.pending.grad_in, None


class _A2AWait(torch.autograd.Function):
    """Complete the all-to-all; in backward, launch the reverse one (so it can overlap other backward work)."""

    @staticmethod
    def forward(ctx, out, pending: _Pending):
        ctx.pending = pending
        pending.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        p.grad_in = p.launch(grad, sum(p.in_splits), p.out_splits, p.in_splits)
        return grad.new_zeros(()).expand_as(grad), None


class A2AHandle:
    """A handle on an in-flight exchange; `wait()` returns `finish(received)` (idempotent)."""

    def __init__(self, out, pending: _Pending, finish):
        self.out, self.pending, self.finish, self.value = out, pending, finish, None

    def wait(self):
        if self.value is None:
            self.value = self.finish(_A2AWait.apply(self.out, self.pending))
        return self.value


def all_to_all_async(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, finish) -> A2AHandle:
    """Start a differentiable variable-split all-to-all of the rows of x."""
    pending = _Pending(group, in_splits, out_splits)
    return A2AHandle(_A2AStart.apply(x, pending), pending, finish)


# ---- the dispatcher -------------------------------------------------------------------------------
class EPDispatcher:
    """Sends each token-choice to the rank that owns its expert and brings the outputs back.

    Same interface as `LocalDispatcher`: dispatch/combine return handles, so ScMoE can overlap them.
    Rank g holds `slots[g]` experts (E/G each under EP; any number under FSSDP, parallel/fssdp.py, which
    also overrides `destinations` to send a choice to one of its expert's replicas).
    """

    def __init__(self, group, expert_rank: list[int], expert_slot: list[int], local_experts: int):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        dest = torch.tensor([r * local_experts + s for r, s in zip(expert_rank, expert_slot)])  # [E]
        self.set_slots([local_experts] * self.ranks, dest)

    def count_traffic(self, d_model: int) -> None:
        """Count the bytes this rank sends to each rank (dispatch and combine rows of d_model values) in
        `sent_bytes` [G] (the serving engine reads them; `reset_traffic` zeroes them)."""
        self.d_model = d_model
        self.sent_bytes = torch.zeros(self.ranks, dtype=torch.int64)

    def reset_traffic(self) -> None:
        if hasattr(self, "sent_bytes"):
            self.sent_bytes.zero_()

    def _count(self, splits: list[int], element_size: int) -> None:
        if hasattr(self, "sent_bytes"):
            self.add_sent(torch.tensor(splits, dtype=torch.int64) * (self.d_model * element_size))

    def add_sent(self, per_rank: torch.Tensor) -> None:
        """Add bytes sent to each rank [G] to `sent_bytes` (when counting; serve/follow.py counts its own rows)."""
        if hasattr(self, "sent_bytes"):
            self.sent_bytes += per_rank.to(torch.int64)

    def set_slots(self, slots: list[int], dest: torch.Tensor) -> None:
        """Rank g holds slots[g] experts; dest [E] is each expert's slot in the ranks' concatenated slots."""
        self.slots = list(slots)
        self.dest = dest
        self._dest_on: dict[torch.device, torch.Tensor] = {}

    def destinations(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The slot (over all ranks' concatenated slots) each token-choice goes to: [T, k]."""
        if expert_ids.device not in self._dest_on:
            self._dest_on[expert_ids.device] = self.dest.to(expert_ids.device)
        return self._dest_on[expert_ids.device][expert_ids]

    def plan(self, dest: torch.Tensor):
        """How the token-choices with destination slots dest [T, k] travel (one exchange of counts):
        (order [T*k] of the rows sent, in_splits / out_splits [G] rows to / from each rank, regroup [N_recv] the
        received rows in local-slot order, counts [local slots] received rows per slot)."""
        G, mine = self.ranks, self.slots[self.me]
        order, send = sort_by_expert(dest, sum(self.slots))  # order [T*k]; send [S] rows per slot of every rank
        recv = send.new_empty(G * mine)
        dist.all_to_all_single(recv, send, [mine] * G, self.slots, group=self.group)  # rows per (source, my slot)
        send_cpu, recv_cpu = send.cpu(), recv.view(G, mine).cpu()
        in_splits = [int(part.sum()) for part in send_cpu.split(self.slots)]
        out_splits = recv_cpu.sum(1).tolist()
        # rows arrive grouped by (source rank, slot): regroup them by slot for the grouped GEMM
        slot_of_row = torch.repeat_interleave(torch.arange(mine).repeat(G), recv_cpu.flatten()).to(dest.device)
        regroup = torch.argsort(slot_of_row, stable=True)
        return order, in_splits, out_splits, regroup, recv_cpu.sum(0).to(dest.device)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> A2AHandle:
        T, k = routing.expert_ids.shape
        order, in_splits, out_splits, regroup, counts = self.plan(self.destinations(routing.expert_ids))
        ungroup, _ = inverse_order(regroup, regroup.numel())
        inverse, _ = inverse_order(order, T * k)
        self._count(in_splits, x.element_size())

        def finish(received: torch.Tensor) -> Dispatched:
            extra = {"in_splits": in_splits, "out_splits": out_splits, "regroup": regroup, "ungroup": ungroup}
            rows = gather_rows(received, regroup, ungroup)
            return Dispatched(rows, counts, order, T * k, routing.weights, 0, extra, inverse=inverse)

        return all_to_all_async(expand_rows(x, order, inverse, None, k), in_splits, out_splits, self.group, finish)

    def combine(self, y: torch.Tensor, d: Dispatched) -> A2AHandle:
        e = d.extra
        back = gather_rows(y, e["ungroup"], e["regroup"])  # undo the regrouping: [N_recv, D]
        self._count(e["out_splits"], y.element_size())

        def finish(returned: torch.Tensor) -> torch.Tensor:
            return unpermute(returned, d.order, d.weights, d.num_choices, d.inverse)

        return all_to_all_async(back, e["out_splits"], e["in_splits"], self.group, finish)


# ---- wrapping a model ---------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the gradient is summed too (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def global_stats(group):
    """A router statistics reducer that sums over `group`, differentiably."""
    return lambda t: _AllReduceSum.apply(t, group)


def shard_experts(experts: GroupedExperts, global_ids: list[int]) -> None:
    """Keep only the experts `global_ids` (in this order) of a full GroupedExperts."""
    idx = torch.tensor(global_ids, device=experts.w13.device)
    experts.w13 = nn.Parameter(experts.w13.detach()[idx].clone())
    experts.w2 = nn.Parameter(experts.w2.detach()[idx].clone())
    experts.global_ids, experts.num_experts = list(global_ids), len(global_ids)


def load_placement(path: str, num_layers: int, num_experts: int, ep: int) -> Placement:
    """The placement file (validated against the model), or the contiguous default."""
    if not path:
        return Placement.contiguous(num_layers, num_experts, ep)
    return check_placement(Placement.load(path), num_layers, num_experts, ep, str(path))


def check_placement(placement: Placement, num_layers: int, num_experts: int, ep: int, name: str) -> Placement:
    """`placement` if it fits the model and the ep ranks with the same number of experts on each, else a PlacementError."""
    placement.validate(num_layers=num_layers, num_experts=num_experts, num_gpus=ep)
    uneven = [(l, g) for l in range(num_layers) for g in range(ep) if len(placement.experts_on(l, g)) != num_experts // ep]
    if uneven:
        layer, gpu = uneven[0]
        raise PlacementError(
            f"{name}: expert parallelism needs {num_experts // ep} experts on every gpu, but layer {layer} puts "
            f"{len(placement.experts_on(layer, gpu))} on gpu {gpu}; remove \"allow_uneven\" and balance the counts"
        )
    return placement


def apply_expert_parallel(model: nn.Module, ctx: ParallelContext, placement: Placement) -> None:
    """Shard every MoE layer's experts over the ep group and route through all-to-all."""
    for layer_idx, moe in enumerate(model.moe_layers()):
        if ctx.ep == 1:  # data parallel only: every rank holds every expert, the local dispatcher suffices
            moe.router.reduce_stats = global_stats(ctx.stats_group)  # (a capacity factor applies per rank)
        else:
            moe.dispatcher = shard_layer(moe, ctx, placement, layer_idx)


def shard_layer(moe: nn.Module, ctx: ParallelContext, placement: Placement, layer_idx: int) -> EPDispatcher:
    """Keep this rank's experts of MoE layer `layer_idx`, sum router statistics over the world, and return
    the all-to-all dispatcher over the ep group for that layer's placement row."""
    row = placement.expert_to_gpu[layer_idx]
    mine = placement.experts_on(layer_idx, ctx.ep_rank)
    slots = [placement.slot_of(layer_idx, e)[1] for e in range(moe.num_experts)]
    shard_experts(moe.experts, mine)
    moe.router.reduce_stats = global_stats(ctx.stats_group)
    return EPDispatcher(ctx.ep_group, row, slots, len(mine))


def expert_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The expert-stacked parameters (sharded under EP)."""
    return [
        (f"{n}.{pn}", p)
        for n, m in model.named_modules() if isinstance(m, GroupedExperts)
        for pn, p in m.named_parameters(recurse=False)
    ]


# No buffer broadcast each forward: tokens_seen is rank-local (DDP ignores it), expert_bias moves the same
# way on every rank (from all-reduced counts) and the RoPE tables are constants. torch 2.13 renamed the
# switch (broadcast_buffers warns there); torch 2.11, on the GPU machines, only has the old name.
_NO_BUFFER_SYNC_PER_FORWARD = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def parallelize(model: nn.Module, ctx: ParallelContext, placement_path: str = "", for_training: bool = True) -> nn.Module:
    """Apply EP (and, for training, DDP) when running on several ranks; returns the module to call."""
    if not ctx.distributed:
        if placement_path:
            load_placement(placement_path, len(model.moe_layers()), model.cfg.moe.num_experts, 1)
        return model
    placement = load_placement(placement_path, len(model.moe_layers()), model.cfg.moe.num_experts, ctx.ep)
    apply_expert_parallel(model, ctx, placement)
    return wrap_dense(model, ctx) if for_training else model


def wrap_dense(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """DDP over the whole world for the non-expert parameters (experts are sharded: their gradients are
    `finish_gradients`'s)."""
    ignore = [n for n, _ in expert_params(model)] + [n for n, _ in model.named_buffers() if n.endswith("tokens_seen")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(
        model, process_group=ctx.grad_group, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
        **_NO_BUFFER_SYNC_PER_FORWARD,
    )


def finish_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """Expert gradients: every ep rank's loss reached them, so divide by ep, then average over dp."""
    if not ctx.distributed:
        return
    params = [p for _, p in expert_params(model)]
    for p in params:  # every rank takes part in the same collectives, whatever its local state
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params]).div_(ctx.ep)
    if ctx.dp > 1:  # one coalesced SUM, then divide: gloo has no AVG
        dist.all_reduce(flat, group=ctx.dp_group)
        flat.div_(ctx.dp)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()


def clip_grad_norm(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Clip by the global gradient norm: replicated parameters once, sharded experts summed over ep."""
    experts = {id(p) for _, p in expert_params(model)}
    dense_sq = torch.zeros((), device=ctx.device)
    expert_sq = torch.zeros((), device=ctx.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().square().sum()
        if id(p) in experts:
            expert_sq += sq
        else:
            dense_sq += sq
    if ctx.distributed and ctx.ep > 1:
        dist.all_reduce(expert_sq, group=ctx.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total  # a tensor: reading it would synchronise the device
