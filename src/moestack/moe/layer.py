"""MoELayer: router -> dispatcher -> experts -> combine, plus optional shared experts."""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.moe.dispatch import LocalDispatcher
from moestack.moe.experts import GroupedExperts, SwiGLU, fused_inference
from moestack.moe.fused import BLOCK_M
from moestack.moe.router import Router, Routing


class MoELayer(nn.Module):
    """A token-choice MoE FFN. Parallel code swaps `dispatcher` and `experts`; the model never knows."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        d_ff: int,
        *,
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        bias_balancing: bool = False,
        capacity_factor: float = 0.0,
        shared_experts: int = 0,
        shared_d_ff: int | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.router = Router(d_model, num_experts, top_k, renormalize, aux_loss_coef, z_loss_coef, bias_balancing)
        self.dispatcher = LocalDispatcher(num_experts, capacity_factor)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, impl)
        width = (shared_d_ff or d_ff) * shared_experts
        self.shared = SwiGLU(d_model, width) if shared_experts > 0 else None
        # Token-choices per global expert since the last reset: read by PEC, traces and load metrics.
        self.register_buffer("tokens_seen", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.last_routing: Routing | None = None
        self.dropped = 0  # token-choices over capacity in the last forward (0 when dropless)
        # Under autocast, cast the rows to the autocast dtype before dispatch (see `dispatch`); models/hf.py
        # turns it off: Hugging Face's experts compute in their weights' dtype, autocast or not
        self.rows_in_autocast_dtype = True
        # Small-batch path (moe/fused.py): forwards without gradients of at most this many token-choices run
        # the fused Triton kernels where Triton runs and the dispatcher allows it; 0 = off (the serving
        # engine turns it on for decode-sized batches)
        self.fused_rows = 0
        # add each forward's counts to tokens_seen (training's statistics); the serving engine, which reads each
        # step's loads instead, turns it off (one kernel per layer and step fewer)
        self.count_tokens = True

    def route(self, x: torch.Tensor) -> Routing:
        """Route [T, D] tokens and record the statistics."""
        d_model = self.router.gate.in_features
        if x.shape[-1] != d_model:
            raise ValueError(f"MoELayer expects tokens of hidden size {d_model} ([..., {d_model}]), got shape "
                             f"{tuple(x.shape)}; pass the hidden states the layer was built for")
        if x.dim() != 2:
            raise ValueError(f"MoELayer.route takes flat tokens [T, {d_model}], got shape {tuple(x.shape)}; "
                             f"flatten them first (x.reshape(-1, {d_model})), as MoELayer.forward does")
        # decode-sized fused forwards: the router's top-k kernel also plans the fused MoE's blocks
        fused = self.fused_rows and x.shape[0] * self.router.top_k <= self.fused_rows
        routing = self.router(x, plan_block_m=BLOCK_M if fused else 0)
        if self.count_tokens:
            self.tokens_seen += routing.counts.detach()
        self.last_routing = routing
        return routing

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """Start moving tokens to their experts; returns a handle (wait() -> Dispatched).

        Under autocast the rows travel and the experts run in the autocast dtype (bf16 on a GPU): the
        residual stream stays fp32 and the router keeps its fp32 logits, but the all-to-all moves half the
        bytes and the grouped GEMMs run at bf16 speed, as the dense layers do under autocast.
        """
        kind = x.device.type
        if self.rows_in_autocast_dtype and torch.is_autocast_enabled(kind) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(kind))
        return self.dispatcher.dispatch(x, routing)

    def compute(self, handle):
        """Run the experts on dispatched tokens and start the combine; returns a handle (wait() -> [T, D])."""
        d = handle.wait()
        self.dropped = d.dropped
        y = self.experts(d.x, d.counts)
        return self.dispatcher.combine(y, d)

    def fused(self, x: torch.Tensor, routing: Routing, summed: bool = True) -> torch.Tensor | None:
        """The routed experts' output [T, D] through the fused small-batch kernels, or None where they do not
        apply (off, too many rows, gradients wanted, no Triton, or a dispatcher without `fused_parts`).
        summed False: each token's k weighted choice rows [T, k, D], for a consumer that sums them as it reads."""
        rows = routing.expert_ids.numel()
        plan = getattr(self.dispatcher, "fused_parts", None)
        if not (self.fused_rows and rows <= self.fused_rows and plan is not None and fused_inference(x, routing.weights)):
            return None
        parts = plan(routing)
        if parts is None:
            return None
        from moestack.moe.fused import fused_experts

        P, parts_run = parts
        kind = x.device.type
        if self.rows_in_autocast_dtype and torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        return fused_experts(x, routing.expert_ids, routing.weights, self.experts.w13, self.experts.w2, P, parts_run,
                             routing.plan, summed)

    def routed(self, x: torch.Tensor, routing: Routing, summed: bool = True) -> torch.Tensor:
        """The routed experts' weighted output for flat tokens x [T, D] (no shared experts): [T, D]; with summed
        False, where the fused kernels run, each token's choice rows [T, k, D] (`fused`)."""
        y = self.fused(x, routing, summed)
        if y is None:
            y = self.compute(self.dispatch(x, routing)).wait()
        return y

    def output(self, flat: torch.Tensor, summed: bool = True) -> torch.Tensor:
        """The layer's output for flat tokens [T, D] without its losses (inference; `last_routing` has them).
        summed False: may be a stack [T, k, D] of rows whose sum is the output (see `routed`)."""
        routing = self.route(flat)
        y = self.routed(flat, routing, summed or self.shared is not None)
        return y if self.shared is None else y + self.shared(flat)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D] -> (y [..., D], aux loss scalar)."""
        shape = x.shape
        y = self.output(x.reshape(-1, shape[-1]))
        routing = self.last_routing
        return y.view(shape), routing.aux_loss + routing.z_loss
