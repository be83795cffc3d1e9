"""DualSparse expert partition and neuron-level reconstruction: pure functions on stacked expert weights.

A SwiGLU expert is a sum over its F intermediate neurons, y = sum_i silu(x.g_i) (x.u_i) w2_i, so its
neurons can be split into P groups ("parts", the paper's sub-experts) whose outputs add up to the expert's
output. `PartExperts` keeps each expert whole, its neurons grouped by part, so that a token-choice running
j parts reads a prefix of the expert's weights (see its docstring).
Notation: E = experts, D = hidden size, F = expert hidden size, P = parts, f = F / P.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moestack.moe.experts import GroupedExperts, grouped_mm, loop_mm, swiglu


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


def to_parts(w13: torch.Tensor, parts: int) -> torch.Tensor:
    """[gate | up] columns of w13 [E, D, 2F] -> per part, its gate then its up columns: [g_0 u_0 g_1 u_1 ...]."""
    E, D, two_f = w13.shape
    f = two_f // 2 // parts
    gate, up = (t.reshape(E, D, parts, 1, f) for t in w13.chunk(2, dim=-1))
    return torch.cat([gate, up], dim=3).reshape(E, D, two_f).contiguous()


def from_parts(w13: torch.Tensor, parts: int) -> torch.Tensor:
    """The inverse of `to_parts`: [g_0 u_0 g_1 u_1 ...] -> [gate | up]."""
    E, D, two_f = w13.shape
    f = two_f // 2 // parts
    per_part = w13.reshape(E, D, parts, 2, f)
    return torch.cat([per_part[:, :, :, 0].reshape(E, D, -1), per_part[:, :, :, 1].reshape(E, D, -1)], -1).contiguous()


class PartExperts(GroupedExperts):
    """E SwiGLU experts whose F neurons form P parts of f = F/P neurons; a row runs the first j parts.

    w13 [E, D, 2F] is in `to_parts` order and w2 [E, F, D] holds the parts' rows in order, so the first j
    parts of every expert are the first 2jf columns of w13 and the first jf rows of w2: one grouped GEMM
    pair per j runs exactly the kept neurons of the rows that need j parts, and each row is gathered once.
    Three input layouts:
    - full, x [N, D] grouped by expert with counts [E] (drop rate 0): every row runs all P parts, one
      grouped GEMM pair over the whole experts, as `GroupedExperts` runs them. The other two take counts
      [P, E] rows per (j - 1, expert):
    - segments, x [P, R, D] (single process): x[j - 1] holds the rows running j parts, grouped by expert,
      then padding. The GEMMs read the valid row counts from the device (their offsets), so there is no
      host sync; returns P outputs [R, D] whose rows past each segment's count are undefined.
    - packed, x [N, D] (expert parallel): rows sorted by (j, expert), j ascending; rows after the counted
      ones are ignored. One host sync (the segment sizes); returns the counted rows' outputs [M, D].
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, parts: int, impl: str = "auto"):
        check_parts(d_ff, parts)
        super().__init__(num_experts, d_model, d_ff, impl)
        self.parts = parts

    def forward(self, x: torch.Tensor, counts: torch.Tensor):
        if counts.dim() == 1:
            return self._run(self.parts, x, counts)
        if x.dim() == 3:
            return self.forward_segments(x, counts)
        sizes = counts.sum(dim=1).tolist()  # the layer's one host sync
        segments = zip(range(1, self.parts + 1), x[: sum(sizes)].split(sizes), counts)
        outs = [self._run(j, xj, cj) for j, xj, cj in segments if xj.shape[0]]
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)

    def forward_segments(self, x: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """x [P, R, D] padded segments -> P outputs [R, D] (rows past counts[j - 1].sum() undefined)."""
        if self.use_grouped_mm(x):
            offsets = torch.cumsum(counts, 1, dtype=torch.int32)  # [P, E] every segment's offsets at once
            return [self._run(j, x[j - 1], counts[j - 1], offsets[j - 1]) for j in range(1, self.parts + 1)]
        outs = []
        for j, n in enumerate(counts.sum(dim=1).tolist(), start=1):  # the loop needs host sizes anyway
            out = x.new_zeros(x.shape[1], self.d_model)
            if n:
                out[:n] = self._run(j, x[j - 1, :n], counts[j - 1])
            outs.append(out)
        return outs

    def _run(self, j: int, x: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The first j parts of each row's expert: x [n, D] grouped by expert (counts [E], their cumulative
        sum `offsets` int32 if known) -> [n, D]."""
        f = self.d_ff // self.parts
        w13, w2 = self.w13, self.w2
        if j < self.parts:
            w13, w2 = w13[:, :, : 2 * j * f], w2[:, : j * f]
        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
        if self.use_grouped_mm(x):
            if offsets is None:
                offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            act = swiglu(grouped_mm(x, w13, offsets), parts=j, rows=offsets[-1:])  # [n, jf]
            return grouped_mm(act, w2, offsets)
        sizes = counts.tolist()
        return loop_mm(swiglu(loop_mm(x, w13, sizes), parts=j), w2, sizes)

    def full_experts(self) -> GroupedExperts:
        """The same experts as a plain GroupedExperts ([gate | up] layout; neurons in this object's order)."""
        with torch.device("meta"):
            out = GroupedExperts(self.num_experts, self.d_model, self.d_ff, self.impl)
        out.w13 = nn.Parameter(from_parts(self.w13.detach(), self.parts))
        out.w2 = nn.Parameter(self.w2.detach().clone())
        out.global_ids = list(self.global_ids)
        return out


def part_experts(experts: GroupedExperts, parts: int, perm: torch.Tensor | None = None) -> PartExperts:
    """`experts` as PartExperts with P parts (each expert's neurons reordered by `perm` [E, F] first, if given)."""
    check_parts(experts.d_ff, parts)
    w13, w2 = experts.w13.detach(), experts.w2.detach()
    if perm is not None:
        w13, w2 = reorder_neurons(w13, w2, perm.to(w13.device))
    return part_experts_like(experts, parts, to_parts(w13, parts), w2.contiguous())


def part_experts_like(experts: GroupedExperts, parts: int, w13=None, w2=None) -> PartExperts:
    """PartExperts shaped like `experts`; weights given (in `to_parts` layout) or left uninitialised."""
    E, D, F_ = experts.num_experts, experts.d_model, experts.d_ff
    # torch._grouped_mm needs 16-byte aligned rows: parts of an odd width fall back to the loop
    impl = "loop" if experts.impl == "auto" and (F_ // parts) % 8 else experts.impl
    with torch.device("meta"):
        out = PartExperts(E, D, F_, parts, impl)
    like = {"device": experts.w13.device, "dtype": experts.w13.dtype}
    out.w13 = nn.Parameter(w13 if w13 is not None else torch.empty(E, D, 2 * F_, **like))
    out.w2 = nn.Parameter(w2 if w2 is not None else torch.empty(E, F_, D, **like))
    out.global_ids = list(experts.global_ids)
    return out
