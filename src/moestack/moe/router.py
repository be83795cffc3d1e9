"""Router: fp32 linear gate, softmax, top-k, and the balancing losses.

Notation: T = tokens, E = experts, k = experts per token, D = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sums a tensor over every rank that routes tokens (identity in one process). The parallel wrapper
# installs a differentiable all-reduce so the aux loss sees global token statistics.
StatsReducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Routing:
    """What the router decided for T tokens: the one thing every later stage reads."""

    expert_ids: torch.Tensor  # [T, k] int64, global expert ids
    weights: torch.Tensor  # [T, k] fp32 combine weights
    counts: torch.Tensor  # [E] int64 token-choices per expert (this rank's tokens)
    aux_loss: torch.Tensor  # scalar, already scaled by its coefficient
    z_loss: torch.Tensor  # scalar, already scaled by its coefficient
    # the fused MoE's plan of these choices (moe/fused.py's `align`: sorted entries, block experts, padded
    # total), when the router made it in its top-k kernel (serving decode steps); None otherwise
    plan: tuple | None = None


def plan_rows(entries: int, num_experts: int, block_m: int) -> int:
    """The most rows a plan of `entries` choices over `num_experts` experts needs, each expert's rows padded to
    a multiple of block_m (the fused MoE's static grid: moe/fused.py)."""
    return -(-(entries + min(num_experts, entries) * (block_m - 1)) // block_m) * block_m


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids (int64 [n]), without a host sync.

    torch.bincount sizes its output from ids.max(), which on CUDA waits for the device; a scatter-add into
    n zeros does not, so the CPU can queue the rest of the layer while the GPU routes.
    """
    ones = torch.ones_like(ids, dtype=torch.int64)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, ones)


class Router(nn.Module):
    """Token-choice top-k router with Switch aux loss, z-loss and optional DeepSeek-V3 bias balancing."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        bias_balancing: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"Router: top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.bias_balancing = bias_balancing
        # Aux-loss-free balancing: added to the scores for selection only, never to the weights.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=bias_balancing)
        self.reduce_stats: StatsReducer = _identity
        # Gate logits: fp32 (moestack's models), or False: in the input's dtype, then fp32 for the softmax, as
        # Hugging Face's MoE routers do (models/hf.py sets it, so bf16 models route the tokens HF routes).
        self.logits_in_fp32 = True
        # Serving on CUDA (the runner sets it): softmax, top-k, weights and counts in one Triton kernel
        # (moe/router_triton.py) when no loss and no gradient is wanted.
        self.fused_topk = False
        self._zero: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, plan_block_m: int = 0) -> Routing:
        """x [T, D] -> Routing. plan_block_m > 0 (the fused MoE's decode blocks): where the top-k runs as a Triton
        kernel and the batch fits one program, the same kernel also plans the fused MoE (Routing.plan)."""
        fused = self.fused_topk and self.aux_loss_coef == 0 and self.z_loss_coef == 0 and not (
            torch.is_grad_enabled() and (x.requires_grad or self.gate.weight.requires_grad))
        w = self.gate.weight
        bias = self.expert_bias if self.bias_balancing else None
        renorm = self.renormalize and self.top_k > 1
        if self.logits_in_fp32:
            logits = F.linear(x.float(), w.float())  # [T, E] in fp32
        else:
            logits = F.linear(x, w)  # [T, E], rounded to x's dtype, then fp32 for the softmax
        if fused:
            from moestack.moe import router_triton

            if plan_block_m and router_triton.plan_fits(x.shape[0], self.num_experts):
                return self._fused(*router_triton.topk_plan(logits, self.top_k, renorm, bias, plan_block_m, plan_rows(
                    x.shape[0] * self.top_k, self.num_experts, plan_block_m)))
            return self._fused(*router_triton.topk_softmax(logits, self.top_k, renorm, bias))
        logits = logits.float()
        probs = logits.softmax(dim=-1)  # [T, E]
        select = probs + bias if bias is not None else probs
        _, expert_ids = select.topk(self.top_k, dim=-1)  # [T, k]
        weights = probs.gather(-1, expert_ids)  # [T, k]
        if renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = count_ids(expert_ids.flatten(), self.num_experts)  # [E]
        aux, z = self.losses(logits, probs, counts)
        return Routing(expert_ids, weights, counts, aux, z)

    def _fused(self, ids, weights, counts, plan=None) -> Routing:
        if self._zero is None or self._zero.device != ids.device:
            self._zero = torch.zeros((), dtype=torch.float32, device=ids.device)  # the losses: none (read, never written)
        return Routing(ids, weights, counts, self._zero, self._zero, plan)

    def losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor):
        """Switch load-balancing loss E * sum_e f_e * P_e and z-loss mean(logsumexp^2), over all ranks."""
        zero = logits.new_zeros(())
        aux = z = zero
        if self.aux_loss_coef > 0:
            global_counts = self.reduce_stats(counts.float())  # [E]
            choices = global_counts.sum().clamp(min=1)  # tokens * top_k over every rank (1 if none: no 0/0)
            frac = global_counts / choices  # f_e: [E], no grad
            mean_prob = self.reduce_stats(probs.sum(dim=0)) * self.top_k / choices  # P_e: [E], differentiable
            aux = self.aux_loss_coef * self.num_experts * (frac.detach() * mean_prob).sum()
        if self.z_loss_coef > 0:
            # a mean that is 0, not NaN, over no tokens (an EP rank can receive none)
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().sum() / max(logits.shape[0], 1)
        return aux, z

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 update: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        load = counts.float()
        self.expert_bias += rate * torch.sign(load.mean() - load)
