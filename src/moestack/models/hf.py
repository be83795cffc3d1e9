"""Hugging Face MoE models on moestack MoE layers: `from_hf` swaps each sparse MoE block in, `to_hf` back.

Attention, norms, embeddings and the LM head stay Hugging Face's; only the sparse MoE blocks become
`MoEBlock`s around a moestack `MoELayer`, so every moestack method that works on `MoELayer`s (DualSparse,
routing traces, ...) works on the converted model. Written for the transformers v5 layout (experts
stacked as `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F], router `gate.weight` [E, D]).
Notation: E = experts, D = hidden size, F = expert hidden size, F' = shared expert hidden size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from moestack.moe.dispatch import LocalDispatcher
from moestack.moe.experts import GroupedExperts, SwiGLU
from moestack.moe.layer import MoELayer


@dataclass(frozen=True)
class Family:
    """What differs between the supported Hugging Face MoE families."""

    module: str  # transformers module holding the block class
    block: str  # class name of the sparse MoE block
    renormalize_key: str | None  # config flag for top-k renormalisation; None = always renormalise
    gated_shared_expert: bool  # Qwen2-MoE: sigmoid-gated shared expert next to the routed ones


_HF = "transformers.models"
FAMILIES = {
    "mixtral": Family(f"{_HF}.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", None, False),
    "qwen2_moe": Family(f"{_HF}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "norm_topk_prob", True),
    "qwen3_moe": Family(f"{_HF}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "norm_topk_prob", False),
    "olmoe": Family(f"{_HF}.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "norm_topk_prob", False),
}
SUPPORTED = tuple(FAMILIES)


class GatedSharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: sigmoid(x . g) * SwiGLU(x), added to the routed experts' output."""

    def __init__(self, ffn: SwiGLU, gate: nn.Linear):
        super().__init__()
        self.ffn, self.gate = ffn, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.ffn(x)  # [T, 1] * [T, D]


class MoEBlock(nn.Module):
    """Stands in for a Hugging Face sparse MoE block: [B, S, D] -> [B, S, D] through a moestack MoELayer."""

    def __init__(self, moe: MoELayer, family: str, hf_config):
        super().__init__()
        self.moe = moe
        self.family = family
        self.hf_config = hf_config  # to rebuild the Hugging Face block in `to_hf`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _hf_collecting("router_logits"):
            raise ValueError(
                "output_router_logits=True is not supported on a model converted by moestack.models.hf.from_hf: "
                "its MoE blocks route with moestack's Router, which Hugging Face's hooks do not see. Call "
                "to_hf(model) first, or take the router's aux loss from the block's layer: aux = block.moe(x)[1]")
        y, _ = self.moe(hidden_states)
        return y


def _hf_collecting(key: str) -> bool:
    """Whether the running Hugging Face forward collects the outputs named `key` (transformers v5 hooks)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers: no collector, nothing to check
        return False
    collected = _active_collector.get()
    return collected is not None and key in collected


def family_of(model: nn.Module) -> str:
    """The supported family of a Hugging Face model, or a ValueError naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"moestack.models.hf supports Hugging Face MoE models of type {', '.join(SUPPORTED)} "
            f"(MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM); got "
            f"{type(model).__name__} with model_type={model_type!r}"
        )
    return model_type


def block_class(family: str) -> type:
    """The Hugging Face sparse MoE block class of a family."""
    fam = FAMILIES[family]
    return getattr(importlib.import_module(fam.module), fam.block)


@torch.no_grad()
def from_hf(model: nn.Module) -> nn.Module:
    """Replace every sparse MoE block of a Hugging Face Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE model in place.

    The new `MoEBlock`s share the router and shared-expert weights and hold a re-laid-out copy of the
    expert weights; the logits are unchanged (fp32, up to summation order). Returns the same model.
    """
    family = family_of(model)
    cls = block_class(family)
    blocks = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, cls)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no {cls.__name__} to convert")
    for name, block in blocks:
        _replace(model, name, MoEBlock(moe_layer_from_block(block, family, model.config), family, model.config))
    return model


@torch.no_grad()
def to_hf(model: nn.Module) -> nn.Module:
    """Put Hugging Face sparse MoE blocks back in place of `MoEBlock`s, with the current weights."""
    blocks = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoEBlock)]
    for name, block in blocks:
        _replace(model, name, block_from_moe_layer(block))
    return model


def moe_layer_from_block(block: nn.Module, family: str, config) -> MoELayer:
    """A moestack MoELayer computing what the Hugging Face sparse MoE `block` computes."""
    fam = FAMILIES[family]
    _check_supported(block, family, config)
    experts = block.experts
    E, two_f, D = experts.gate_up_proj.shape  # [E, 2F, D]
    top_k = block.gate.top_k
    renormalize = True if fam.renormalize_key is None else bool(getattr(config, fam.renormalize_key))
    with torch.device("meta"):  # no memory or init time for weights that are replaced right away
        layer = MoELayer(D, E, top_k, two_f // 2, renormalize=renormalize, aux_loss_coef=0.0, z_loss_coef=0.0)
    layer.router.gate.weight = block.gate.weight  # [E, D], shared
    layer.router.logits_in_fp32 = False  # HF rounds the gate logits to the model's dtype: same experts in bf16
    layer.rows_in_autocast_dtype = False  # HF's experts run in their weights' dtype, under autocast too
    layer.experts.w13 = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())  # [E, D, 2F]
    layer.experts.w2 = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())  # [E, F, D]
    if fam.gated_shared_expert:
        layer.shared = GatedSharedExpert(_swiglu_from_mlp(block.shared_expert), block.shared_expert_gate)
    _materialize_buffers(layer, block.gate.weight.device)
    return layer


def block_from_moe_layer(wrapper: MoEBlock) -> nn.Module:
    """The Hugging Face sparse MoE block of `wrapper`'s family holding `wrapper.moe`'s current weights."""
    layer = wrapper.moe
    if type(layer.experts) is not GroupedExperts or type(layer.dispatcher) is not LocalDispatcher:
        raise ValueError(
            "to_hf needs plain moestack experts and the local dispatcher; this layer was transformed "
            f"(experts {type(layer.experts).__name__}, dispatcher {type(layer.dispatcher).__name__}), "
            "which a Hugging Face block cannot express"
        )
    with torch.device("meta"):
        block = block_class(wrapper.family)(wrapper.hf_config)
    block.gate.weight = layer.router.gate.weight
    block.experts.gate_up_proj = nn.Parameter(layer.experts.w13.detach().transpose(1, 2).contiguous())  # [E, 2F, D]
    block.experts.down_proj = nn.Parameter(layer.experts.w2.detach().transpose(1, 2).contiguous())  # [E, D, F]
    if FAMILIES[wrapper.family].gated_shared_expert:
        gate_up = layer.shared.ffn.w13.weight  # [2F', D]: gate rows then up rows
        half = gate_up.shape[0] // 2
        block.shared_expert.gate_proj.weight = nn.Parameter(gate_up.detach()[:half].clone())
        block.shared_expert.up_proj.weight = nn.Parameter(gate_up.detach()[half:].clone())
        block.shared_expert.down_proj.weight = layer.shared.ffn.w2.weight
        block.shared_expert_gate = layer.shared.gate
    _materialize_buffers(block, layer.router.gate.weight.device)
    return block


def _swiglu_from_mlp(mlp: nn.Module) -> SwiGLU:
    """A moestack SwiGLU equal to a Hugging Face gate/up/down MLP (F' = its intermediate size)."""
    f, d = mlp.gate_proj.weight.shape  # [F', D]
    with torch.device("meta"):
        ffn = SwiGLU(d, f)
    ffn.w13.weight = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach())  # [2F', D]
    ffn.w2.weight = mlp.down_proj.weight  # [D, F'], shared
    return ffn


def _check_supported(block: nn.Module, family: str, config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family}: moestack experts are SwiGLU (silu); this model uses hidden_act={act!r}")
    if not hasattr(block.experts, "gate_up_proj"):
        raise ValueError(
            f"{family}: expected the transformers v5 layout (experts.gate_up_proj [E, 2F, D]); "
            "upgrade transformers to >= 5"
        )
    renorm = FAMILIES[family].renormalize_key is None or getattr(config, FAMILIES[family].renormalize_key)
    if block.gate.top_k == 1 and renorm:
        raise ValueError(f"{family}: top-1 routing with renormalised weights (every weight 1.0) is not supported")


def _materialize_buffers(module: nn.Module, device: torch.device) -> None:
    """Give buffers left on the meta device real zeros (every such buffer here starts at zero)."""
    for mod in module.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters {left} were not converted")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
