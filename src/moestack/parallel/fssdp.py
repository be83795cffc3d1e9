"""Fully sharded sparse data parallelism (FSSDP, Hecate: arXiv 2502.02581) for the MoE layers.

`--parallel.mode fssdp` instead of EP. Over the `ep` group (all ranks unless --dp is given):
- **Sharding**: each MoE layer's experts, with their AdamW states, live once, on their owner; the owners
  come from a placement file (`"allow_uneven": true` allowed) or the heterogeneous plan
  (parallel/fssdp_plan.py: the same slot count on every rank, any number of one layer's experts). Every
  `fssdp_reshard_every` steps the plan is redone from the loads since the last one and, where it changed,
  parameters and optimizer states move to their new owners (one all-to-all per layer).
- **Materialization**: each step, from the loads of the last `fssdp_window` steps, `materialize` picks
  copies of the hottest experts (at most `fssdp_budget` per rank and layer). *SparseAllGather*: one
  variable-split all-to-all per layer sends each owner's rows to the ranks that copy them, started when
  the layer's block begins (it overlaps attention) and waited for by the experts. *SparseReduceScatter*
  is its backward: the reverse all-to-all carries each copy's gradient to the owner, where the gradients
  of an expert's copies and its own are summed (the backward of the index_select that made the copies), so
  the owner alone steps its optimizer. *Re-materialization* (`fssdp_rematerialize`, Hecate-RM): the
  copies are not kept for backward; they are gathered again when backward reaches the layer.
- **Dispatch**: `FSSDPDispatcher` sends a token-choice to this rank's copy of its expert if there is one,
  else to a holder on this node (torchrun's LOCAL_WORLD_SIZE), else to any holder; choices are spread
  over those holders by their position.
Bytes materialized, gathered and reduced per step go to metrics.jsonl (`FSSDP.record`).
Notation: G = ranks of the sharding group, E = experts per layer, P = numbers in one expert (w13 and w2).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from moestack.config import ConfigError, ParallelConfig
from moestack.moe.experts import GroupedExperts
from moestack.moe.layer import MoELayer
from moestack.parallel.ep import EPDispatcher, all_to_all_async, global_stats
from moestack.parallel.fssdp_plan import balance, device_loads, heterogeneous_sharding, materialize
from moestack.parallel.mesh import ParallelContext
from moestack.placement.placement import Placement


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the expert rows travel in: the autocast dtype when autocast is on, else t's."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class _Regather(torch.autograd.Function):
    """Identity on the experts' output whose backward gathers the copies again (Hecate-RM), on every rank,
    before the GEMMs' backward unpacks the weights it dropped."""

    @staticmethod
    def forward(ctx, y, box):
        ctx.box = box
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.box.regather()
        return grad, None


class _Rematerialized:
    """saved_tensors_hooks that keep no materialized weight for backward: a saved view of one is replaced
    by its geometry, rebuilt on the weights `regather` brings back."""

    def __init__(self, experts: "ShardedExperts", weights: tuple[torch.Tensor, torch.Tensor]):
        self.experts = experts
        self.ptrs = [w.untyped_storage().data_ptr() if w.numel() else -1 for w in weights]
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr() if t.numel() else -2
        if ptr in self.ptrs:
            self.pending += 1
            return ("fssdp-rm", self.ptrs.index(ptr), t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "fssdp-rm"):
            return packed
        _, which, size, stride, offset = packed
        if self.weights is None:
            raise RuntimeError("FSSDP re-materialization: a dropped expert weight was needed before the copies "
                               "were gathered again; this is a bug in moestack (please report it)")
        out = self.weights[which].as_strided(size, stride, offset)
        self.pending -= 1
        if self.pending == 0:
            self.weights = None  # the last use: the copies go again
        return out

    def regather(self) -> None:
        with torch.no_grad():
            self.weights = self.experts.materialized(*self.experts.gather_sync())
        if self.pending == 0:
            self.weights = None


class ShardedExperts(GroupedExperts):
    """This rank's owned experts of one layer (parameters, optimizer states) plus, per step, the copies of
    other ranks' experts it materializes. Slots: owned experts (ascending ids), then copies by (owner, id)."""

    def __init__(self, full: GroupedExperts, owned: list[int], group):
        nn.Module.__init__(self)  # no reset_parameters: the weights come from `full`, the RNG is left alone
        self.num_experts, self.d_model, self.d_ff, self.impl = len(owned), full.d_model, full.d_ff, full.impl
        self._grouped_ok = full._grouped_ok
        idx = torch.tensor(owned, dtype=torch.long, device=full.w13.device)
        self.w13 = nn.Parameter(full.w13.detach()[idx].clone())
        self.w2 = nn.Parameter(full.w2.detach()[idx].clone())
        self.global_ids = list(owned)
        self.group = group
        self.rematerialize = False
        self.set_plan(np.zeros(0, dtype=np.int64), [])
        self.bytes = {"gathered": 0, "reduced": 0, "materialized": 0}

    # ---- the step's plan --------------------------------------------------------------------------
    def set_plan(self, owner: np.ndarray, replicas: list[list[int]]) -> None:
        """Copies for this step: replicas[g] = experts rank g materializes (none of its own)."""
        sent: list[int] = []
        self.replica_ids, self.in_splits, self.out_splits = [], [], []
        if any(len(r) for r in replicas):  # the plan is the same on every rank: all skip, or none
            me, G = dist.get_rank(self.group), dist.get_world_size(self.group)
            sent, self.in_splits, self.replica_ids, self.out_splits = _exchange(
                G, me, lambda d: [e for e in replicas[d] if owner[e] == me],
                lambda o: [e for e in replicas[me] if owner[e] == o])
        slot = {e: i for i, e in enumerate(self.global_ids)}
        self.send_idx = torch.tensor([slot[e] for e in sent], dtype=torch.long, device=self.w13.device)
        self._pending = None

    @property
    def slot_ids(self) -> list[int]:
        """Global expert id of every slot the dispatcher fills this step."""
        return self.global_ids + self.replica_ids

    def _flat(self, dtype: torch.dtype) -> torch.Tensor:
        """The owned experts as rows [n_own, P] in `dtype` (differentiable; n_own may be 0)."""
        return torch.cat([_rows(self.w13), _rows(self.w2)], dim=1).to(dtype)

    def _row_bytes(self, dtype: torch.dtype) -> int:
        return (_width(self.w13) + _width(self.w2)) * dtype.itemsize

    # ---- SparseAllGather / SparseReduceScatter ----------------------------------------------------
    def start_gather(self, dtype: torch.dtype | None = None) -> None:
        """Send the owned rows to the ranks that copy them (async; its backward returns their gradients)."""
        if self._pending is not None or not self.in_splits:
            return
        dtype = dtype or compute_dtype(self.w13)
        own = self._flat(dtype)
        handle = all_to_all_async(own.index_select(0, self.send_idx), self.in_splits, self.out_splits,
                                  self.group, lambda received: received)
        received = sum(self.out_splits) * self._row_bytes(dtype)
        self.bytes["gathered"] += received
        self.bytes["materialized"] += received
        if torch.is_grad_enabled() and self.w13.requires_grad:
            self.bytes["reduced"] += received  # each copy's gradient goes back to its owner in backward
        self._pending = (own, handle, dtype)

    def gather_sync(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned rows, received rows) now, without autograd: the re-gather of Hecate-RM."""
        dtype = self._pending_dtype
        own = self._flat(dtype)
        received = own.new_empty(sum(self.out_splits), own.shape[1])
        dist.all_to_all_single(received, own.index_select(0, self.send_idx).contiguous(), self.out_splits,
                               self.in_splits, group=self.group)
        self.bytes["gathered"] += received.numel() * dtype.itemsize
        return own, received

    def materialized(self, own: torch.Tensor, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [S, D, 2F] and w2 [S, F, D] over this step's slots, from owned and received rows."""
        rows = torch.cat([own, received])  # even when none arrived: the gather's backward must run on every rank
        n, a = rows.shape[0], _width(self.w13)
        return (rows[:, :a].reshape(n, *self.w13.shape[1:]).contiguous(),
                rows[:, a:].reshape(n, *self.w2.shape[1:]).contiguous())

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: [N, D] rows grouped by slot; counts: [S] rows per slot
        if not self.in_splits:  # not sharded (one process) or no plan yet: the owned experts only
            return self.run(x, counts, self.w13, self.w2)
        self.start_gather(x.dtype if x.is_floating_point() else None)
        own, handle, dtype = self._pending
        self._pending, self._pending_dtype = None, dtype
        weights = self.materialized(own, handle.wait())
        if not (self.rematerialize and torch.is_grad_enabled() and self.w13.requires_grad):
            return self.run(x, counts, *weights)
        box = _Rematerialized(self, weights)
        with torch.autograd.graph.saved_tensors_hooks(box.pack, box.unpack):
            y = self.run(x, counts, *weights)
        return _Regather.apply(y, box)


class FSSDPDispatcher(EPDispatcher):
    """EP's all-to-all over slots that change every step: a choice goes to a local copy of its expert, else
    to a holder on this node, else to any holder, spread over them by the choice's position."""

    def __init__(self, group, node_size: int):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.node_size = node_size
        self.table = torch.zeros(1, 1, dtype=torch.long)
        self.holders = torch.ones(1, dtype=torch.long)
        self._tables_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_plan(self, slot_ids: list[list[int]], num_experts: int) -> None:
        """slot_ids[g]: the global expert of every slot of rank g this step (owned first)."""
        G, me = self.ranks, self.me
        offsets = np.cumsum([0] + [len(s) for s in slot_ids])
        where: list[list[int]] = [[] for _ in range(num_experts)]  # global slots holding each expert
        rank_of: list[list[int]] = [[] for _ in range(num_experts)]
        for g in range(G):
            for i, e in enumerate(slot_ids[g]):
                where[e].append(int(offsets[g] + i))
                rank_of[e].append(g)
        rows = []
        for e in range(num_experts):
            if not where[e]:
                raise RuntimeError(f"FSSDP plan: expert {e} is held by no rank; this is a bug in moestack (please report it)")
            pairs = list(zip(rank_of[e], where[e]))
            local = [s for g, s in pairs if g == me]
            node = [s for g, s in pairs if g // self.node_size == me // self.node_size]
            rows.append(local or node or [s for _, s in pairs])
        width = max(len(r) for r in rows)
        self.table = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)
        self.holders = torch.tensor([len(r) for r in rows], dtype=torch.long)
        self.slots = [len(s) for s in slot_ids]
        self._tables_on = {}

    def destinations(self, expert_ids: torch.Tensor) -> torch.Tensor:
        dev = expert_ids.device
        if dev not in self._tables_on:
            self._tables_on[dev] = (self.table.to(dev), self.holders.to(dev))
        table, holders = self._tables_on[dev]
        position = torch.arange(expert_ids.numel(), device=dev).view_as(expert_ids) + self.me
        return table[expert_ids, position % holders[expert_ids]]


class FSSDP:
    """The per-step driver: plans copies before each step, records loads and traffic after it, re-shards."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, cfg: ParallelConfig, owner: np.ndarray):
        self.ctx, self.cfg = ctx, cfg
        self.layers: list[MoELayer] = model.moe_layers()
        self.num_experts = self.layers[0].num_experts
        self.owner = np.asarray(owner, dtype=np.int64)
        self.window: list[np.ndarray] = []  # global loads [L, E] of the last steps
        self.since_reshard = np.zeros_like(self.owner, dtype=np.float64)
        self.replicas: list[list[list[int]]] = [[[] for _ in range(ctx.ep)] for _ in self.layers]
        self.reshards = 0
        node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))
        for layer_idx, moe in enumerate(self.layers):
            mine = [e for e in range(self.num_experts) if self.owner[layer_idx, e] == ctx.ep_rank]
            moe.experts = ShardedExperts(moe.experts, mine, ctx.ep_group)
            moe.experts.rematerialize = cfg.fssdp_rematerialize
            moe.dispatcher = FSSDPDispatcher(ctx.ep_group, max(1, min(node, ctx.ep)))
            moe.router.reduce_stats = global_stats(ctx.stats_group)
        self._hooks = [_parent_of(model, moe).register_forward_pre_hook(_start_gather(moe)) for moe in self.layers]
        self.plan_step()

    # ---- each step ------------------------------------------------------------------------------
    def prepare(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before step `step`: re-shard when it is due and the plan changed, then plan this step's copies."""
        every = self.cfg.fssdp_reshard_every
        if every and step > 0 and step % every == 0 and self.since_reshard.sum() > 0:
            self.reshard(heterogeneous_sharding(self.since_reshard, self.ctx.ep), optimizer)
            self.since_reshard[:] = 0
        self.plan_step()

    def plan_step(self) -> None:
        """Copies for the next forward from the loads predicted by the sliding window (none without history)."""
        predicted = np.mean(self.window, axis=0) if self.window else None
        for l, moe in enumerate(self.layers):
            reps = (materialize(predicted[l], self.owner[l], self.ctx.ep, self.cfg.fssdp_budget)
                    if predicted is not None else [[] for _ in range(self.ctx.ep)])
            self.replicas[l] = reps
            self._apply(l, moe, reps)

    def _apply(self, l: int, moe: MoELayer, reps: list[list[int]]) -> None:
        moe.experts.set_plan(self.owner[l], reps)
        slot_ids = [sorted(e for e in range(self.num_experts) if self.owner[l, e] == g)
                    + sorted(reps[g], key=lambda e: (self.owner[l, e], e)) for g in range(self.ctx.ep)]
        if slot_ids[self.ctx.ep_rank] != moe.experts.slot_ids:
            raise RuntimeError("FSSDP: the dispatcher's slots differ from the experts' (a bug in moestack)")
        moe.dispatcher.set_plan(slot_ids, self.num_experts)

    def record(self) -> dict:
        """After a training step: add its global loads to the window; the step's FSSDP figures (all ranks)."""
        counts = torch.stack([m.last_routing.counts.detach() for m in self.layers]).to(torch.float64)
        traffic = torch.tensor([[m.experts.bytes[k] for k in ("gathered", "reduced", "materialized")]
                                for m in self.layers], dtype=torch.float64, device=counts.device).sum(0)
        both = torch.cat([counts.flatten(), traffic])
        dist.all_reduce(both, group=self.ctx.stats_group)
        loads = both[:counts.numel()].view_as(counts).cpu().numpy() / self.ctx.dp  # the dp replicas count once
        totals = both[counts.numel():].cpu().numpy() / self.ctx.dp
        self.window = (self.window + [loads])[-self.cfg.fssdp_window:]
        self.since_reshard += loads
        before = [balance(device_loads(loads[l], self.owner[l], [[]] * self.ctx.ep, self.ctx.ep)) for l in range(len(self.layers))]
        after = [balance(device_loads(loads[l], self.owner[l], self.replicas[l], self.ctx.ep)) for l in range(len(self.layers))]
        for m in self.layers:
            m.experts.bytes = dict.fromkeys(m.experts.bytes, 0)
        mb = 1 / 2**20
        return {
            "fssdp_gathered_mb": float(totals[0] * mb), "fssdp_reduced_mb": float(totals[1] * mb),
            "fssdp_materialized_mb": float(totals[2] * mb),
            "fssdp_copies": int(sum(len(r) for reps in self.replicas for r in reps)),
            "fssdp_owner_max_mean": float(np.mean(before)), "fssdp_max_mean": float(np.mean(after)),
            "fssdp_reshards": self.reshards,
        }

    # ---- re-sharding ----------------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, new_owner: np.ndarray, optimizer: torch.optim.Optimizer | None) -> bool:
        """Move experts (weights and AdamW moments) to the owners of `new_owner` [L, E]; False if unchanged."""
        new_owner = np.asarray(new_owner, dtype=np.int64)
        if np.array_equal(new_owner, self.owner):
            return False
        me, G = self.ctx.ep_rank, self.ctx.ep
        for l, moe in enumerate(self.layers):
            if np.array_equal(new_owner[l], self.owner[l]):
                continue
            ex = moe.experts
            params = [ex.w13, ex.w2]
            moments = [m for m in ("exp_avg", "exp_avg_sq") if optimizer is not None and all(
                m in optimizer.state.get(p, {}) for p in params)]
            parts = params + [optimizer.state[p][m] for m in moments for p in params]
            rows = torch.cat([_rows(t).float() for t in parts], 1)
            slot = {e: i for i, e in enumerate(ex.global_ids)}
            sent, in_splits, recv_ids, out_splits = _exchange(
                G, me, lambda d: [e for e in ex.global_ids if new_owner[l, e] == d],
                lambda o: [e for e in range(self.num_experts) if self.owner[l, e] == o and new_owner[l, e] == me])
            received = rows.new_empty(sum(out_splits), rows.shape[1])
            dist.all_to_all_single(received, _take(rows, [slot[e] for e in sent]), out_splits, in_splits,
                                   group=self.ctx.ep_group)
            keep = [e for e in ex.global_ids if new_owner[l, e] == me]
            ids = keep + recv_ids
            new_ids = sorted(ids)
            pool = _take(torch.cat([_take(rows, [slot[e] for e in keep]), received]), [ids.index(e) for e in new_ids])
            offset, new_params, new_state = 0, [], {}
            for t_idx, t in enumerate(parts):
                width = _width(t)
                value = pool[:, offset: offset + width].reshape(len(new_ids), *t.shape[1:]).to(t.dtype)
                offset += width
                if t_idx < len(params):
                    new_params.append(nn.Parameter(value))
                else:
                    m, p = moments[(t_idx - len(params)) // len(params)], params[(t_idx - len(params)) % len(params)]
                    new_state.setdefault(p, {})[m] = value
            # new Parameter objects (autograd keeps a parameter's shape), swapped into the optimizer too
            for name, old, new in zip(("w13", "w2"), params, new_params):
                setattr(ex, name, new)
                if optimizer is not None:
                    for group in optimizer.param_groups:
                        group["params"] = [new if q is old else q for q in group["params"]]
                    state = optimizer.state.pop(old, {})
                    state.update(new_state.get(old, {}))
                    if state:
                        optimizer.state[new] = state
            ex.global_ids, ex.num_experts = new_ids, len(new_ids)
            ex.send_idx = ex.send_idx.new_zeros(0)
        self.owner = new_owner
        self.reshards += 1
        return True


def _exchange(ranks: int, me: int, to, frm) -> tuple[list[int], list[int], list[int], list[int]]:
    """One all-to-all of whole experts: (ids sent, in_splits, ids received, out_splits). to(d) / frm(o) list
    the expert ids this rank sends to rank d / receives from rank o (nothing to or from itself); ascending
    ids on both sides, so what a rank sends is in the order its peer expects."""
    sent, in_splits, received, out_splits = [], [], [], []
    for g in range(ranks):
        out, inc = (sorted(to(g)), sorted(frm(g))) if g != me else ([], [])
        sent += out
        received += inc
        in_splits.append(len(out))
        out_splits.append(len(inc))
    return sent, in_splits, received, out_splits


def _width(t: torch.Tensor) -> int:
    """Numbers in one expert's slice of an expert-stacked tensor."""
    return int(np.prod(t.shape[1:]))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """An expert-stacked tensor as one row per expert (works for no experts too)."""
    return t.reshape(t.shape[0], _width(t))


def _take(rows: torch.Tensor, index: list[int]) -> torch.Tensor:
    return rows.index_select(0, torch.tensor(index, dtype=torch.long, device=rows.device))


def _parent_of(model: nn.Module, moe: MoELayer) -> nn.Module:
    """The module whose forward contains `moe` (its block), where the gather can start before attention."""
    for module in model.modules():
        if any(child is moe for child in module.children()):
            return module
    return moe


def _start_gather(moe: MoELayer):
    def hook(module, args):
        moe.experts.start_gather()
    return hook


def initial_owners(placement_path: str, num_layers: int, num_experts: int, ranks: int) -> np.ndarray:
    """owner [L, E]: the placement file's (uneven counts allowed), else the heterogeneous plan on uniform loads."""
    if not placement_path:
        return heterogeneous_sharding(np.ones((num_layers, num_experts)), ranks)
    placement = Placement.load(placement_path)
    if placement.num_gpus != ranks:
        raise ConfigError(f"{placement_path} places experts on {placement.num_gpus} GPUs but FSSDP shards over "
                          f"{ranks} ranks; make a placement for {ranks} (moestack plan --gpus {ranks})")
    placement = replace(placement, allow_uneven=True)  # FSSDP owners need not be even
    placement.validate(num_layers=num_layers, num_experts=num_experts, num_gpus=ranks)
    return placement.to_array()


def apply_fssdp(model: nn.Module, ctx: ParallelContext, cfg: ParallelConfig) -> FSSDP:
    """Shard every MoE layer's experts over the ep group, FSSDP style; returns the per-step driver."""
    layers = model.moe_layers()
    owner = initial_owners(cfg.placement, len(layers), layers[0].num_experts, ctx.ep)
    return FSSDP(model, ctx, cfg, owner)


__all__ = ["FSSDP", "FSSDPDispatcher", "ShardedExperts", "apply_fssdp", "initial_owners"]
