"""DualSparse expert partition and neuron-level reconstruction: pure functions on stacked expert weights.

A SwiGLU expert is a sum over its F intermediate neurons, y = sum_i silu(x.g_i) (x.u_i) w2_i, so its
neurons can be split into P groups ("sub-experts") whose outputs add up to the expert's output. Sub-expert
p of expert e becomes expert e*P + p of a `GroupedExperts(E*P, D, F/P)`, so one grouped GEMM runs them all.
Notation: E = experts, D = hidden size, F = expert hidden size, P = parts, f = F / P.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moestack.moe.experts import GroupedExperts


def check_parts(d_ff: int, parts: int) -> None:
    """Raise a ValueError unless `parts` evenly divides the expert hidden size."""
    if parts < 1 or d_ff % parts:
        raise ValueError(f"parts={parts} must be >= 1 and divide the expert hidden size {d_ff}")


def neuron_abs_sums(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum over each expert's rows of |silu(gate) * up|, per neuron: [E, F] float64 (x [N, D] grouped by expert)."""
    out = torch.zeros(experts.num_experts, experts.d_ff, dtype=torch.float64, device=x.device)
    w13 = experts.w13.to(x.dtype)
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        if xe.shape[0]:  # one expert at a time keeps the [rows, F] activations small
            gate, up = (xe @ w13[e]).chunk(2, dim=-1)
            out[e] = (F.silu(gate) * up).abs().sum(dim=0, dtype=torch.float64)
    return out


def neuron_importance(act_abs_mean: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Mean |silu(gate_i) up_i| over an expert's tokens times ||w2 row i||: [E, F]."""
    return act_abs_mean * w2.float().norm(dim=-1)  # [E, F] * [E, F]


def weight_proxy_importance(w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Importance from weights alone (experts no calibration token reached): ||g_i|| ||u_i|| ||w2_i||, [E, F]."""
    gate, up = w13.float().chunk(2, dim=-1)  # [E, D, F] each
    return gate.norm(dim=1) * up.norm(dim=1) * w2.float().norm(dim=-1)


def reorder_neurons(w13: torch.Tensor, w2: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute each expert's neurons (perm [E, F]): gate and up columns of w13 [E, D, 2F], rows of w2 [E, F, D]."""
    E, D, two_f = w13.shape
    gate, up = w13.chunk(2, dim=-1)
    cols = perm.unsqueeze(1).expand(E, D, two_f // 2)
    w13 = torch.cat([gate.gather(2, cols), up.gather(2, cols)], dim=-1)
    return w13, w2.gather(1, perm.unsqueeze(-1).expand_as(w2))


def split_experts(w13: torch.Tensor, w2: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts -> stacked sub-experts: w13 [E*P, D, 2f] (gate then up), w2 [E*P, f, D]."""
    E, D, two_f = w13.shape
    f = two_f // 2 // parts
    gate, up = (t.reshape(E, D, parts, f).permute(0, 2, 1, 3) for t in w13.chunk(2, dim=-1))  # [E, P, D, f]
    w13_sub = torch.cat([gate, up], dim=-1).reshape(E * parts, D, 2 * f)
    return w13_sub.contiguous(), w2.reshape(E * parts, f, w2.shape[-1]).contiguous()


def merge_experts(w13_sub: torch.Tensor, w2_sub: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `split_experts`: w13 [E, D, 2F], w2 [E, F, D]."""
    EP, D, two_f = w13_sub.shape
    E, f = EP // parts, two_f // 2
    gate, up = (t.reshape(E, parts, D, f).permute(0, 2, 1, 3).reshape(E, D, parts * f) for t in w13_sub.chunk(2, -1))
    return torch.cat([gate, up], dim=-1).contiguous(), w2_sub.reshape(E, parts * f, -1).contiguous()


def sub_experts(experts: GroupedExperts, parts: int, perm: torch.Tensor | None = None) -> GroupedExperts:
    """A GroupedExperts over E*P sub-experts (neurons reordered by `perm` [E, F] first, if given)."""
    check_parts(experts.d_ff, parts)
    w13, w2 = experts.w13.detach(), experts.w2.detach()
    if perm is not None:
        w13, w2 = reorder_neurons(w13, w2, perm.to(w13.device))
    w13_sub, w2_sub = split_experts(w13, w2, parts)
    return sub_experts_like(experts, parts, w13_sub, w2_sub)


def sub_experts_like(experts: GroupedExperts, parts: int, w13_sub=None, w2_sub=None) -> GroupedExperts:
    """An E*P sub-expert GroupedExperts shaped for `experts`; weights given or left uninitialised."""
    E, D, F_ = experts.num_experts, experts.d_model, experts.d_ff
    # torch._grouped_mm needs 16-byte aligned rows: narrow sub-experts fall back to the loop
    impl = "loop" if experts.impl == "auto" and (F_ // parts) % 8 else experts.impl
    with torch.device("meta"):
        sub = GroupedExperts(E * parts, D, F_ // parts, impl)
    like = {"device": experts.w13.device, "dtype": experts.w13.dtype}
    f = F_ // parts
    sub.w13 = nn.Parameter(w13_sub if w13_sub is not None else torch.empty(E * parts, D, 2 * f, **like))
    sub.w2 = nn.Parameter(w2_sub if w2_sub is not None else torch.empty(E * parts, f, D, **like))
    sub.global_ids = [g * parts + p for g in experts.global_ids for p in range(parts)]
    return sub
