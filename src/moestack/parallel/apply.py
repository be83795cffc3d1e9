"""The one entry the trainer and the run loaders call: EP or FSSDP for the MoE layers, DDP for the rest."""

from __future__ import annotations

import torch.nn as nn

from moestack.config import ParallelConfig
from moestack.parallel import ep
from moestack.parallel.fssdp import FSSDP, apply_fssdp
from moestack.parallel.mesh import ParallelContext


def parallelize(model: nn.Module, ctx: ParallelContext, cfg: ParallelConfig, for_training: bool = True) -> nn.Module:
    """Shard the experts by `cfg.mode` when running on several ranks; returns the module to call. Under FSSDP
    the per-step driver is `sharding_of(model)`."""
    if cfg.mode == "fssdp" and ctx.distributed:
        model.expert_sharding = apply_fssdp(model, ctx, cfg)
        return ep.wrap_dense(model, ctx) if for_training else model
    return ep.parallelize(model, ctx, cfg.placement, for_training)


def sharding_of(model: nn.Module) -> FSSDP | None:
    """The FSSDP driver `parallelize` attached, or None (EP, or one process)."""
    return getattr(model, "expert_sharding", None)
