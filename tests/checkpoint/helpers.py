"""A small moestack-like training state whose values say which step (and expert) they come from."""

from __future__ import annotations

import torch

from moestack.checkpoint import ExpertShard

NUM_LAYERS, NUM_EXPERTS = 2, 8
EXPERT_SHAPE = (4, 6)  # one expert's slice of w1 / w2: [d, f]


def expert_value(step: int, layer: int, expert: int) -> float:
    """Value of every element of expert (layer, expert)'s w1 slice at `step`."""
    return step * 1000.0 + layer * 100.0 + expert


def make_state(step: int, ids=range(NUM_EXPERTS), layers: int = NUM_LAYERS, dense: tuple = (16, 8),
               expert_shape: tuple = EXPERT_SHAPE) -> tuple[dict[str, torch.Tensor], dict[str, ExpertShard]]:
    """(tensors, experts) of one rank holding global experts `ids` of every MoE layer, at `step`."""
    ids = tuple(ids)
    tensors = {
        "model.embed.weight": torch.full(dense, float(step)),
        "optim.model.embed.weight.exp_avg": torch.full(dense, step / 2),
        "model.norm.weight": torch.full((dense[1],), float(step), dtype=torch.bfloat16),
        "optim.model.embed.weight.step": torch.tensor(float(step)),
        "stats.tokens_seen": torch.full((layers, NUM_EXPERTS), step, dtype=torch.int64),
        "rng.rank0.torch": torch.Generator().manual_seed(step).get_state(),
    }
    experts = {}
    for layer in range(layers):
        for w in ("w1", "w2"):
            name = f"model.layers.{layer}.moe.experts.{w}"
            values = torch.tensor([expert_value(step, layer, e) for e in ids]).view(-1, 1, 1)
            tensors[name] = values.expand(len(ids), *expert_shape).contiguous()  # [E_local, d, f]
            for moment, scale in (("exp_avg", 2.0), ("exp_avg_sq", 3.0)):
                tensors[f"optim.{name}.{moment}"] = tensors[name] * scale
            for key in (name, f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"):
                experts[key] = ExpertShard(layer, ids)
    return tensors, experts


def check_experts(tensors: dict[str, torch.Tensor], sources: list[list[int]], ids=range(NUM_EXPERTS),
                  layers: int = NUM_LAYERS) -> None:
    """Assert each expert slice holds the values of the step `sources[layer][expert]` says it came from."""
    ids = tuple(ids)
    for layer in range(layers):
        for w in ("w1", "w2"):
            name = f"model.layers.{layer}.moe.experts.{w}"
            for slot, e in enumerate(ids):
                want = expert_value(sources[layer][e], layer, e)
                assert torch.all(tensors[name][slot] == want), (name, e, tensors[name][slot].flatten()[0], want)
                assert torch.all(tensors[f"optim.{name}.exp_avg_sq"][slot] == 3 * want)
