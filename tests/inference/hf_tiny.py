"""Tiny Hugging Face MoE models of every supported family, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def tiny_config(family: str, **overrides):
    """A small config of `family` (mixtral, qwen2_moe, qwen3_moe, olmoe) with 4-8 experts of hidden size 16-24."""
    import transformers

    if family == "mixtral":
        cfg = dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralConfig(**{**COMMON, **cfg, **overrides})
    if family == "qwen2_moe":
        cfg = dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1)
        return transformers.Qwen2MoeConfig(**{**COMMON, **cfg, **overrides})
    if family == "qwen3_moe":
        cfg = dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=True, head_dim=8)
        return transformers.Qwen3MoeConfig(**{**COMMON, **cfg, **overrides})
    if family == "olmoe":
        cfg = dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                   pad_token_id=1, eos_token_id=0)
        return transformers.OlmoeConfig(**{**COMMON, **cfg, **overrides})
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `family` in eval mode (router weights made non-trivial)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # Qwen/OLMoE routers start at zero: give them real, distinct routing
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "gate_up_proj" in name or "down_proj" in name:
                p.normal_(0, 0.2)
    return model


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
