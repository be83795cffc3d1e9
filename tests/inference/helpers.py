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
    """Rows the first projection's GEMMs compute in each forward of `experts` (a context manager).

    Counts what the kernels are asked to compute: a grouped GEMM's last offset (rows past it are never
    computed), or a looped GEMM's rows. Wraps the GEMM functions the expert modules call while active.
    """

    def __init__(self, experts):
        self.experts, self.rows = experts, []
        self._saved = []

    def __enter__(self):
        import moestack.inference.partition as partition
        import moestack.moe.experts as experts

        def counting(fn, rows_of):
            def run(x, w, arg):
                if w.shape[-2] == self.experts.d_model:  # w13: K = hidden size (w2 has K = kept neurons)
                    self.rows[-1] += rows_of(x, arg)
                return fn(x, w, arg)
            return run

        for mod in (partition, experts):
            for name, rows_of in (("grouped_mm", lambda x, offs: int(offs[-1]) if offs.numel() else 0),
                                  ("loop_mm", lambda x, sizes: x.shape[0])):
                self._saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, counting(getattr(mod, name), rows_of))
        self.handle = self.experts.register_forward_pre_hook(lambda mod, args: self.rows.append(0))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        for mod, name, fn in self._saved:
            setattr(mod, name, fn)
