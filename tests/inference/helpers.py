"""Small moestack models, layers and inputs for the DualSparse tests."""

from __future__ import annotations

import torch

from moestack.config import load_config
from moestack.models.transformer import MoETransformer
from moestack.moe.layer import MoELayer

D, E, K, F = 16, 8, 2, 24  # hidden, experts, top-k, expert hidden


def tiny_config(**overrides):
    base = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 16,
            "moe.num_experts": 4, "moe.d_ff": 24, "train.device": "cpu"}
    return load_config(overrides={**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(tiny_config(**overrides)).eval()


def token_batches(n: int, seed: int = 0, batch: int = 4, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, seq), generator=g) for _ in range(n)]


def moe_layer(seed: int = 0, **kwargs) -> MoELayer:
    """An MoE layer with weights large enough that experts differ visibly."""
    torch.manual_seed(seed)
    layer = MoELayer(D, E, K, F, aux_loss_coef=0.0, z_loss_coef=0.0, **kwargs)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
        layer.experts.w13.normal_(0, 0.3)
        layer.experts.w2.normal_(0, 0.3)
    return layer.eval()


def hidden_batches(n: int, tokens: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, D, generator=g) for _ in range(n)]


class RowCounter:
    """Counts the rows each call of a GroupedExperts computes (its output rows; a forward hook)."""

    def __init__(self, experts):
        self.rows: list[int] = []
        self.handle = experts.register_forward_hook(lambda mod, args, out: self.rows.append(out.shape[0]))
