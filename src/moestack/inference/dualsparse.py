"""DualSparse-MoE (arXiv 2508.18376) on moestack MoE layers: partition, reconstruct, drop.

`sparsify(model, calib_batches, drop_rate, parts=2)` transforms, in place, every moestack `MoELayer` of a
model (a `MoETransformer`, a `from_hf` model, or a bare layer) through two of the layer's seams:
- experts: each expert's F neurons are reordered by calibrated importance (major neurons first) and split
  into P parts (sub-experts) of F/P neurons that share the expert's gate value: `PartExperts(E, D, F, P)`;
- dispatcher: a `DualSparseDispatcher` that skips the sub-expert computations with the smallest estimated
  contribution (routing weight x calibrated part size), at a threshold calibrated to `drop_rate`; with
  `whole_rows`, batches of at most that many choices (memory-bound decode) drop whole sub-experts instead.
At drop rate 0 the model computes the same function. `naive_drop` and `sparsify(..., reconstruct=False)`
are the baselines of the quality study. Notation: E = experts, F = expert hidden size, P = parts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.inference.calibration import LayerStats, calibrate
from moestack.inference.dropping import DualSparseDispatcher, quantile_table
from moestack.inference.partition import (
    PartExperts,
    check_parts,
    neuron_importance,
    part_experts,
    part_experts_like,
    weight_proxy_importance,
)
from moestack.moe.dispatch import LocalDispatcher
from moestack.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every moestack MoELayer of `model` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def sparsify(model: nn.Module, calib_batches, drop_rate: float, parts: int = 2, *, reconstruct: bool = True,
             load_aware: bool = False, max_rank_rate: float | None = None, whole_rows: int = 0) -> nn.Module:
    """DualSparse every MoE layer of `model` in place and return it (same forward signature).

    calib_batches: an iterable of model inputs (token ids [B, S], (x, y) pairs or kwargs dicts).
    drop_rate: target fraction of sub-expert computations skipped. reconstruct=False keeps the neuron
    order (the "partition without reconstruction" ablation). whole_rows: batches of at most that many
    (token, expert) choices drop whole sub-experts (`dropping.keep_whole_subexperts`; 0: none do).
    """
    return _transform(model, calib_batches, drop_rate, parts, reconstruct, weight_only=False,
                      load_aware=load_aware, max_rank_rate=max_rank_rate, whole_rows=whole_rows)


def naive_drop(model: nn.Module, calib_batches, drop_rate: float) -> nn.Module:
    """The baseline: skip whole (token, expert) computations with the lowest routing weights at `drop_rate`."""
    return _transform(model, calib_batches, drop_rate, 1, False, weight_only=True, load_aware=False, max_rank_rate=None)


def set_drop_rate(model: nn.Module, drop_rate: float, load_aware: bool = False, max_rank_rate: float | None = None,
                  expert_rank: list[list[int]] | None = None, whole_rows: int = 0) -> None:
    """Change the target drop rate (and policy) of a sparsified model without recalibrating.

    expert_rank: per MoE layer, the EP rank of each global expert (a placement's `expert_to_gpu`); load-aware
    dropping levels the kept work over these ranks. Omitted: keep the ranks already set.
    """
    _check_rate(drop_rate)
    disps = dispatchers(model)
    if expert_rank is not None:
        shape = [len(row) for row in expert_rank]
        want = [d.num_experts for d in disps]
        if shape != want:
            raise ValueError(f"expert_rank has rows of lengths {shape}; this model needs one row per MoE layer with "
                             f"one EP rank per expert: lengths {want} (a placement's expert_to_gpu)")
        bad = sorted({r for row in expert_rank for r in row if isinstance(r, bool) or not isinstance(r, int) or r < 0})
        if bad:
            raise ValueError(f"expert_rank holds {bad}: EP ranks are integers >= 0")
    for i, disp in enumerate(disps):
        if expert_rank is not None:
            disp.set_ranks(list(expert_rank[i]))
        disp.set_policy(drop_rate, load_aware, max_rank_rate, whole_rows)


def dispatchers(model: nn.Module) -> list[DualSparseDispatcher]:
    """The DualSparse dispatchers of a sparsified model (one per MoE layer)."""
    found = [layer.dispatcher for layer in moe_layers(model) if isinstance(layer.dispatcher, DualSparseDispatcher)]
    if not found:
        raise ValueError("the model has no DualSparse layers; call sparsify(model, ...) first")
    return found


def drop_stats(model: nn.Module) -> dict:
    """Sub-expert computations skipped since the last reset, over all layers: {drop_rate, skipped, total}."""
    ds = dispatchers(model)
    skipped, total = sum(d.skipped for d in ds), sum(d.total for d in ds)
    return {"drop_rate": skipped / total if total else 0.0, "skipped": skipped, "total": total}


def reset_drop_stats(model: nn.Module) -> None:
    """Zero the skipped/total counters of every DualSparse layer."""
    for d in dispatchers(model):
        d.reset_stats()


def install(layer: MoELayer, parts: int, experts: PartExperts | None = None) -> DualSparseDispatcher:
    """Swap in the DualSparse experts and dispatcher of `layer` (uninitialised weights unless given)."""
    if experts is None:
        check_parts(layer.experts.d_ff, parts)
        experts = part_experts_like(layer.experts, parts)
    disp = DualSparseDispatcher(layer.num_experts, parts).to(experts.w13.device)
    layer.experts = experts
    layer.dispatcher = disp  # an nn.Module, so its calibration tensors join the state_dict
    return disp


def _transform(model, calib_batches, drop_rate, parts, reconstruct, weight_only, load_aware, max_rank_rate,
               whole_rows=0):
    _check_rate(drop_rate)
    layers = moe_layers(model)
    _check_layers(layers, parts)
    with torch.no_grad():
        stats = calibrate(model, layers, calib_batches)
        for layer, st in zip(layers, stats):
            _transform_layer(layer, st, parts, reconstruct, weight_only)
    set_drop_rate(model, drop_rate, load_aware, max_rank_rate, whole_rows=whole_rows)
    return model


def _transform_layer(layer: MoELayer, st: LayerStats, parts: int, reconstruct: bool, weight_only: bool) -> None:
    experts = layer.experts
    importance = neuron_importance(st.act_abs_mean(), experts.w2.detach())  # [E, F]
    unseen = st.rows == 0
    if unseen.any():  # experts no calibration token reached: order by their weights instead
        proxy = weight_proxy_importance(experts.w13.detach(), experts.w2.detach())
        importance = torch.where(unseen.unsqueeze(1), proxy, importance)
    E, F_ = importance.shape
    neurons = torch.arange(F_, device=importance.device).expand(E, F_)
    perm = importance.argsort(dim=1, descending=True, stable=True) if reconstruct else neurons
    scale = _part_scale(importance.gather(1, perm), unseen, parts, weight_only)  # [E, P]
    # store the parts largest first, so a choice's kept computations are its expert's first parts
    by_size = scale.argsort(dim=1, descending=True, stable=True)  # [E, P]; the identity after reconstruction
    perm = perm.view(E, parts, F_ // parts).gather(1, by_size.unsqueeze(-1).expand(E, parts, F_ // parts))
    scale = scale.gather(1, by_size)
    disp = install(layer, parts, part_experts(experts, parts, perm.reshape(E, F_)))
    disp.scale.copy_(scale)
    ids, weights = st.routing()  # [T, k]
    disp.table.copy_(quantile_table(weights.unsqueeze(-1) * scale[ids]))


def _part_scale(importance: torch.Tensor, unseen: torch.Tensor, parts: int, weight_only: bool) -> torch.Tensor:
    """Estimated output size of each sub-expert per unit routing weight: [E, P] (ones for weight-only scoring)."""
    E, F_ = importance.shape
    if weight_only:
        return torch.ones(E, parts, device=importance.device)
    scale = importance.view(E, parts, F_ // parts).sum(dim=-1)  # [E, P]
    if unseen.any() and not unseen.all():
        scale[unseen] = scale[~unseen].mean(dim=0)
    return scale


def _check_rate(drop_rate: float) -> None:
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


def _check_layers(layers: list[MoELayer], parts: int) -> None:
    if not layers:
        raise ValueError("the model has no moestack MoE layers; convert a Hugging Face model with "
                         "moestack.models.hf.from_hf first")
    for layer in layers:
        if isinstance(layer.dispatcher, DualSparseDispatcher):
            raise ValueError("the model is already sparsified; use set_drop_rate to change the drop rate")
        if type(layer.dispatcher) is not LocalDispatcher or layer.dispatcher.capacity_factor > 0:
            raise ValueError(
                "sparsify calibrates on one process with the dropless local dispatcher; load the model without "
                "expert parallelism and with moe.capacity_factor=0, then shard it with "
                "moestack.inference.ep.shard_sparse"
            )
        check_parts(layer.experts.d_ff, parts)
