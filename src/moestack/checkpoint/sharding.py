"""Fully sharded saving: who writes what, so each tensor is written once and bytes per rank balance.

A rank's *layout* is a JSON-able description of the state it holds:
    name -> [shape, dtype, layer, global_ids]   (layer and global_ids are None for non-expert tensors)
Expert-stacked tensors have shape [E_local, ...]; slot i holds global expert global_ids[i].
Non-expert tensors with the same name on several ranks are replicas (written once, by one of them);
per-rank state (RNG) must carry the rank in its name.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from moestack.checkpoint.storage import CheckpointError, check_dtype, dtype_name, expert_key

Layout = dict[str, list[Any]]


@dataclass(frozen=True)
class ExpertShard:
    """One expert-stacked tensor held by this rank: its MoE layer and the global id of each dim-0 slot.

    `layer` indexes the rows of the [L, E] expert token counts given to `CheckpointManager.save`.
    """

    layer: int
    global_ids: tuple[int, ...]


@dataclass(frozen=True)
class Item:
    """One unit of writing: a whole non-expert tensor, or one expert's slice of an expert-stacked tensor."""

    key: str  # key in the shard file
    name: str  # tensor name in the training state
    expert: int | None  # global expert id (None: non-expert)
    layer: int | None
    shape: tuple[int, ...]  # of what is written (an expert slice drops dim 0)
    dtype: str
    nbytes: int


def local_layout(tensors: Mapping[str, torch.Tensor], experts: Mapping[str, ExpertShard]) -> Layout:
    """Describe this rank's tensors; ValueError when an ExpertShard does not match its tensor,
    CheckpointError for a dtype safetensors cannot hold."""
    unknown = sorted(set(experts) - set(tensors))
    if unknown:
        raise ValueError(f"experts names tensors that are not in the state: {unknown}")
    layout: Layout = {}
    for name, t in tensors.items():
        if "#" in name:
            raise ValueError(f"tensor name {name!r}: '#' is reserved for expert slice keys")
        check_dtype(name, t)  # at save(), not later in the persist thread
        shard = experts.get(name)
        if shard is not None:
            _check_shard(name, t, shard)
        ids = list(shard.global_ids) if shard else None
        layout[name] = [list(t.shape), dtype_name(t.dtype), shard.layer if shard else None, ids]
    return layout


def _check_shard(name: str, t: torch.Tensor, shard: ExpertShard) -> None:
    if t.dim() == 0 or t.shape[0] != len(shard.global_ids):
        raise ValueError(f"{name}: dim 0 is {tuple(t.shape)[:1]} but ExpertShard lists {len(shard.global_ids)} experts")
    if len(set(shard.global_ids)) != len(shard.global_ids):
        raise ValueError(f"{name}: ExpertShard.global_ids has duplicates {shard.global_ids}")


def layout_digest(layout: Layout) -> str:
    """Short fingerprint of a layout; ranks compare these instead of whole layouts at every save."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def expert_geometry(layouts: list[Layout]) -> tuple[int, int]:
    """(L, E): MoE layers and experts per layer implied by the expert-stacked tensors of all ranks."""
    layers = [entry[2] for layout in layouts for entry in layout.values() if entry[2] is not None]
    ids = [i for layout in layouts for entry in layout.values() if entry[3] is not None for i in entry[3]]
    return (max(layers) + 1 if layers else 0, max(ids) + 1 if ids else 0)


def expert_summary(layouts: list[Layout], num_experts: int) -> dict[str, dict[str, Any]]:
    """name -> {layer, num_experts, shape of one expert's slice, dtype}, checked consistent over ranks."""
    summary: dict[str, dict[str, Any]] = {}
    for rank, layout in enumerate(layouts):
        for name, (shape, dtype, layer, ids) in layout.items():
            if layer is None:
                continue
            entry = {"layer": layer, "num_experts": num_experts, "shape": shape[1:], "dtype": dtype}
            if summary.setdefault(name, entry) != entry:
                raise CheckpointError(f"expert tensor {name!r} differs between ranks (rank {rank}: {entry})")
    _check_coverage(layouts, summary, num_experts)
    return summary


def _check_coverage(layouts: list[Layout], summary: dict[str, dict[str, Any]], num_experts: int) -> None:
    for name in summary:
        held = {i for layout in layouts if name in layout for i in layout[name][3]}
        missing = sorted(set(range(num_experts)) - held)
        if missing:
            raise CheckpointError(f"expert tensor {name!r}: experts {missing} are held by no rank")


def plan_shards(layouts: list[Layout], selected: list[list[int]]) -> list[list[Item]]:
    """Items each rank writes: every non-expert tensor and every selected expert slice exactly once,
    always by a rank that holds it, bytes balanced greedily (fewest holders first, largest first)."""
    holders = _holders(layouts, selected)
    loads = [0] * len(layouts)
    plan: list[list[Item]] = [[] for _ in layouts]
    for item, ranks in sorted(holders.values(), key=lambda v: (len(v[1]), -v[0].nbytes, v[0].key)):
        rank = min(ranks, key=lambda r: (loads[r], r))
        loads[rank] += item.nbytes
        plan[rank].append(item)
    return plan


def _holders(layouts: list[Layout], selected: list[list[int]]) -> dict[str, tuple[Item, list[int]]]:
    holders: dict[str, tuple[Item, list[int]]] = {}
    for rank, layout in enumerate(layouts):
        for name, (shape, dtype, layer, ids) in sorted(layout.items()):
            for item in _items(name, shape, dtype, layer, ids, selected):
                known = holders.setdefault(item.key, (item, []))
                if known[0] != item:
                    raise CheckpointError(f"tensor {name!r} differs between ranks: {known[0]} vs rank {rank}: {item}")
                known[1].append(rank)
    return holders


def _items(name: str, shape: list[int], dtype: str, layer: int | None, ids: list[int] | None,
           selected: list[list[int]]) -> list[Item]:
    itemsize = getattr(torch, dtype).itemsize
    if layer is None:
        return [Item(name, name, None, None, tuple(shape), dtype, math.prod(shape) * itemsize)]
    want = set(selected[layer])
    nbytes = math.prod(shape[1:]) * itemsize
    return [Item(expert_key(name, e), name, e, layer, tuple(shape[1:]), dtype, nbytes) for e in ids if e in want]
