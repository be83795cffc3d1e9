"""Experts: SwiGLU FFNs with weights stacked over experts, run as one grouped GEMM.

Notation: N = expert-sorted rows, E = local experts, D = hidden size, F = expert hidden size.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN (dense layers and shared experts)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)  # [..., 2F]: gate then up
        return self.w2(swiglu(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], h.shape[-1] // 2))  # sizes: any may be 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm rejects expanded ones)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# "auto": the Triton kernel where Triton runs (`triton_runs`), eager PyTorch otherwise; "eager" or "triton"
# force one (benchmarks compare them in one run; MOESTACK_SWIGLU sets the default).
SWIGLU_IMPL = os.environ.get("MOESTACK_SWIGLU", "auto")


def swiglu(h: torch.Tensor, parts: int = 1, rows: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU activation of expert rows h [N, parts * 2f], laid out per part as (gate, up): [N, parts * f].

    rows: optional device int tensor [1]; only the first rows[0] rows are needed (the rest of the output
    is undefined) - the Triton kernel skips them without a host sync, eager computes them anyway.
    On CUDA one Triton kernel each way (moe/swiglu_triton.py): eager's two kernels over strided halves
    took 2.7 ms of a 19.5 ms Mixtral-like layer forward on an H200 (bench/profile_moe.py, 2026-11-25).
    """
    if _use_triton(h):
        from moestack.moe.swiglu_triton import SwiGLUFunction, swiglu_fwd

        if not (torch.is_grad_enabled() and h.requires_grad):  # inference: the kernel without autograd's wrapper
            return swiglu_fwd(h, parts, rows)
        return SwiGLUFunction.apply(h, parts, None)  # a gradient needs every row
    n, f = h.shape[0], h.shape[1] // (2 * parts)
    g = h.view(n, parts, 2, f)  # explicit sizes: n may be 0 (a rank that received no rows)
    return (F.silu(g[:, :, 0]) * g[:, :, 1]).reshape(n, parts * f)


def _use_triton(h: torch.Tensor) -> bool:
    if SWIGLU_IMPL == "eager":
        return False
    if SWIGLU_IMPL == "triton":
        if not triton_runs(h):
            raise RuntimeError("MOESTACK_SWIGLU=triton needs a CUDA tensor and the triton package "
                               "(or TRITON_INTERPRET=1 for Triton's CPU interpreter); use auto or eager here")
        return True
    if SWIGLU_IMPL != "auto":
        raise ValueError(f"MOESTACK_SWIGLU={SWIGLU_IMPL!r}: expected auto, eager or triton")
    return triton_runs(h)


def fused_inference(*tensors: torch.Tensor) -> bool:
    """Whether forward-only Triton kernels may take these inputs: Triton runs on their device
    (`triton_runs`) and no gradient is wanted for any of them (the kernels are not differentiable)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return triton_runs(tensors[0]) and not grad


def sm_count(t: torch.Tensor) -> int:
    """The streaming multiprocessors of t's GPU (what decode kernels size their grids to); 4 off CUDA, where
    Triton's interpreter runs the same choices at toy sizes."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take tensors like t: on CUDA with triton installed, or on the CPU under
    Triton's interpreter (TRITON_INTERPRET=1, read per call: slow, the same kernel code; CI tests it so)."""
    if not triton_available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


_TRITON: list[bool] = []  # filled on first use (a plain global: torch.compile traces it without a warning)


def triton_available() -> bool:
    if not _TRITON:
        try:
            import triton  # noqa: F401
            _TRITON.append(True)
        except ImportError:
            _TRITON.append(False)
    return _TRITON[0]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x in groups ending at `offsets` times the group's matrix: [N, K] x [E, K, M] -> [N, M]."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))


def loop_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The reference: one matmul per expert in a Python loop."""
    outs = [xe @ w[e] for e, xe in enumerate(torch.split(x, counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stacked as w13 [E, D, 2F] and w2 [E, F, D]; one grouped GEMM per projection."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: str = "auto"):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.impl = num_experts, d_model, d_ff, impl
        self.w13 = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.global_ids = list(range(num_experts))  # global expert id of each slot (EP and placement set it)
        self._grouped_ok: dict[tuple, bool] = {}
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=std / math.sqrt(2))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: [N, D] rows grouped by expert; counts: [E] rows per expert
        return self.run(x, counts, self.w13, self.w2)

    def run(self, x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """The experts w13 [E, D, 2F], w2 [E, F, D] (this module's, or copies FSSDP materialized) on x."""
        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
        if self.use_grouped_mm(x):
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            h = grouped_mm(x, w13, offsets)  # [N, 2F]
            return grouped_mm(swiglu(h).contiguous(), w2, offsets)  # [N, D]
        sizes = counts.tolist()
        if sum(sizes) != x.shape[0]:  # the loop syncs anyway; the grouped path trusts its dispatcher
            raise ValueError(f"GroupedExperts: counts sum to {sum(sizes)} rows but x has {x.shape[0]}; a dispatcher "
                             "must pass one count per expert covering exactly the rows it sends")
        return loop_mm(swiglu(loop_mm(x, w13, sizes)), w2, sizes)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether this device and dtype run torch._grouped_mm (probed once per device type and dtype)."""
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        key = (x.device.type, x.dtype)
        if torch.compiler.is_compiling():
            # no probing inside a graph (a failed probe is not catchable while tracing); torch.compile's
            # _grouped_mm takes bf16 only, so other dtypes take the loop
            return x.dtype == torch.bfloat16 and self._grouped_ok.get(key, hasattr(torch, "_grouped_mm"))
        if key not in self._grouped_ok:
            self._grouped_ok[key] = _probe_grouped_mm(x.device, x.dtype)
        return self._grouped_ok[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    a = torch.zeros(16, 16, device=device, dtype=dtype)
    b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
    try:
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):  # unsupported device/dtype: the loop is the fallback
        return False
    return True
