"""Calibration for DualSparse: run the model on calibration batches and record, per MoE layer, what the
experts' neurons do and how tokens are routed.

Hooks sit on module instances (the router's output, the experts' input) and are removed afterwards.
Notation: T = tokens, k = choices, E = experts, F = expert hidden size, N = expert-sorted rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from moestack.inference.partition import neuron_abs_sums
from moestack.moe.layer import MoELayer


@dataclass
class LayerStats:
    """What calibration saw in one MoE layer."""

    act_abs_sum: torch.Tensor  # [E, F] float64: sum over routed rows of |silu(gate) * up|
    rows: torch.Tensor  # [E] int64: rows each expert computed
    expert_ids: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k]
    weights: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k] fp32

    def act_abs_mean(self) -> torch.Tensor:
        """Mean |silu(gate) * up| of each neuron over its expert's rows: [E, F] (0 where no row)."""
        return (self.act_abs_sum / self.rows.clamp_min(1).unsqueeze(1)).float()

    def routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All calibration token-choices: (expert_ids [T, k], weights [T, k])."""
        return torch.cat(self.expert_ids), torch.cat(self.weights)


def run_batch(model: nn.Module, batch) -> None:
    """Forward one calibration batch: a tensor (token ids or, for a bare layer, hidden states), an (x, y)
    pair, or a dict of keyword arguments (Hugging Face)."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[MoELayer], batches) -> list[LayerStats]:
    """Forward `batches` through `model` and collect a LayerStats for each of `layers`."""
    stats, handles = [], []
    for layer in layers:
        E, F_ = layer.experts.num_experts, layer.experts.d_ff
        dev = layer.experts.w13.device
        st = LayerStats(torch.zeros(E, F_, dtype=torch.float64, device=dev),
                        torch.zeros(E, dtype=torch.int64, device=dev))
        handles.append(layer.router.register_forward_hook(_routing_hook(st)))
        handles.append(layer.experts.register_forward_pre_hook(_experts_hook(st)))
        stats.append(st)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrate", unit="batch", leave=False):
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if stats and not any(int(st.rows.sum()) for st in stats):
        raise ValueError("the calibration batches reached no expert; pass at least one non-empty batch")
    return stats


def _routing_hook(st: LayerStats):
    def hook(module, args, routing):
        st.expert_ids.append(routing.expert_ids.detach())
        st.weights.append(routing.weights.detach().float())

    return hook


def _experts_hook(st: LayerStats):
    def hook(experts, args):
        x, counts = args  # [N, D] rows grouped by expert, [E]
        st.act_abs_sum += neuron_abs_sums(experts, x.detach(), counts)
        st.rows += counts

    return hook
