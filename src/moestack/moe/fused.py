"""The small-batch expert path: gather, grouped expert GEMMs and weighted combine in two fused kernels.

Decode steps route few tokens over many experts; the sort + permute + grouped GEMM + unpermute path spends
more on its index kernels than on the weights it reads. `fused_experts` aligns the token-choices into
BLOCK_M-row blocks per expert with device ops only, then runs `fused_triton.moe_gemm` twice (gate/up with the
SwiGLU activation in its epilogue, then down times the routing weight) and sums each token's entries. It reads each
routed expert's weights once per block of rows (for DualSparse only the parts the block's rows run) and
never syncs with the host, so decode CUDA graphs capture it. `MoELayer.fused_rows` turns it on
(the serving engine sets it); the dispatcher seam says which parts run (`fused_parts`).
Notation: T = tokens, k = choices per token, P = parts per expert, R = T * k entries, E = experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moestack.moe.experts import fused_inference, swiglu
from moestack.moe.router import count_ids, plan_rows

BLOCK_M = 16
# Prefill-sized batches (at least this many entries per expert on average) take blocks of BLOCK_M_LARGE rows,
# tiles tuned for compute-bound GEMMs, and with DualSparse one group per (expert, parts run), so every block
# runs exactly its rows' parts. Decode keeps BLOCK_M and mixed blocks: there a block reading part 1 for its
# one-part rows and again for its two-part rows would read those weights twice, and weights are its cost.
BLOCK_M_LARGE = 64
LARGE_ROWS_PER_EXPERT = 64
LARGE_MIN_ROWS = 4096  # above the serving engine's fused_rows: its steps keep the decode blocks (measured so)


@dataclass
class AlignPlan:
    """Entries sorted by expert in blocks of block_m rows, padded with the sentinel num_valid."""

    sorted_ids: torch.Tensor  # [num_blocks * block_m] int32 entry ids
    block_expert: torch.Tensor  # [num_blocks] int32 expert of each block
    total: torch.Tensor  # [1] int32 padded rows in use (blocks at or past it do nothing)
    num_valid: int  # R: entry ids are 0..R-1
    num_blocks: int
    block_m: int

    @property
    def large(self) -> bool:
        """Prefill-sized blocks (compute-bound tiles), past the decode size BLOCK_M."""
        return self.block_m > BLOCK_M


# past this many [entries x groups] cells the one-hot's running count costs more than a sort
ONEHOT_CELLS = 1 << 20
ALIGN_MAX_EXPERTS = 512  # on CUDA up to this many groups (and ONEHOT_CELLS) the plan is one Triton kernel


def align(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> AlignPlan:
    """Plan for entries whose expert is ids [R] (num_experts for an entry not to run). No host sync.
    Decode-sized: no sort, an entry's rank among its expert's entries is a column of the running count of a
    one-hot [R, E] (a few microseconds where a radix sort of a decode batch costs tens); past ONEHOT_CELLS
    cells, a stable sort of the ids gives the ranks instead."""
    R, S, dev = ids.numel(), num_experts, ids.device
    cap = plan_rows(R, S, block_m)  # the most padded rows any routing needs
    if ids.is_cuda and S <= ALIGN_MAX_EXPERTS and R * S <= ONEHOT_CELLS:  # one Triton kernel
        from moestack.moe.fused_triton import align as align_kernel

        sorted_ids, block_expert, total = align_kernel(ids, S, block_m, cap)
        return AlignPlan(sorted_ids, block_expert, total, R, cap // block_m, block_m)
    s = ids.clamp(max=S - 1)
    if R * S <= ONEHOT_CELLS:
        onehot = ids.unsqueeze(1) == torch.arange(S, device=dev, dtype=ids.dtype)  # entries not to run: no column
        running = onehot.to(torch.int32).cumsum(0, dtype=torch.int32)  # [R, S]
        counts = running[-1]  # [S]
        rank = running.gather(1, s.unsqueeze(1)).squeeze(1) - 1  # [R]
    else:
        order = torch.argsort(ids, stable=True)
        counts = count_ids(ids, S + 1)[:S].to(torch.int32)  # entries not to run: the last bucket, dropped
        starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        ranked = torch.arange(R, device=dev, dtype=torch.int32) - starts[s[order]]
        rank = torch.empty_like(ranked).scatter_(0, order, ranked)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0, dtype=torch.int32)
    dest = torch.where(ids < S, (pad_end - padded)[s] + rank, cap).long()
    ids = torch.arange(R, device=dev, dtype=torch.int32)
    sorted_ids = torch.full((cap + 1,), R, dtype=torch.int32, device=dev).scatter_(0, dest, ids)
    num_blocks = cap // block_m
    first_rows = torch.arange(num_blocks, device=dev, dtype=torch.int32) * block_m
    block_expert = torch.searchsorted(pad_end, first_rows, right=True).clamp(max=S - 1).to(torch.int32)
    return AlignPlan(sorted_ids[:cap], block_expert, pad_end[-1:], R, num_blocks, block_m)


def fused_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, parts: int = 1, parts_run: torch.Tensor | None = None,
                  plan: tuple | None = None, summed: bool = True) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the first parts_run[t, k] parts: [T, D] (summed
    False: the weighted terms [T, k, D], for a consumer that sums them as it reads them).

    x [T, D]; expert_ids, weights [T, k]; w13 [E, D, 2F] (per part (gate, up) columns when parts > 1, the
    `partition.to_parts` layout) and w2 [E, F, D]; parts_run [T, k] in 0..P or None for all parts.
    One entry per choice, blocks per expert, as without parts: a block computes the gate/up columns and
    reads the w2 rows of the parts its rows need (the most any of them runs), and each row's down product
    stops at its own parts. plan: the router's plan of expert_ids in BLOCK_M blocks (Routing.plan); a choice
    that runs no part keeps its row there, its block reads only what its other rows run (nothing when none
    runs a part) and its output row is zeros. So DualSparse costs no more entries, blocks or output rows than the plain layer,
    and an expert whose rows all drop a part never reads that part's weights. Prefill-sized batches (see
    LARGE_ROWS_PER_EXPERT) group the blocks by (expert, parts run) too, so no block computes a part one of
    its rows drops: the kept (token, part) work in one launch per projection.
    """
    from moestack.moe.fused_triton import moe_gemm

    T, k = expert_ids.shape
    E, D, two_f = w13.shape
    F = two_f // 2
    flat = expert_ids.flatten()  # [R]
    R = flat.numel()
    j = None
    if parts_run is not None:
        j = parts_run.reshape(-1).to(torch.int32).contiguous()  # [R]
        flat = torch.where(j > 0, flat, torch.full_like(flat, E))  # a choice with nothing to run gets no row
    if R >= max(LARGE_ROWS_PER_EXPERT * E, LARGE_MIN_ROWS):
        # prefill-sized: group (expert, parts run), so a block's rows all run the same parts; its expert is
        # the group // parts
        groups = E * parts
        gid = flat * parts + (j.long() - 1 if j is not None else parts - 1)
        plan = align(torch.where(flat < E, gid, torch.full_like(gid, groups)), groups, BLOCK_M_LARGE)
        plan = replace(plan, block_expert=torch.div(plan.block_expert, parts, rounding_mode="floor"))
    elif plan is not None:  # the router's: a choice DualSparse drops keeps its row, and its products are zeros
        plan = AlignPlan(*plan, R, plan[1].numel(), BLOCK_M)
    else:
        plan = align(flat, E)
    x = x.contiguous()
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    if plan.large:  # compute-bound tiles: the GEMM, then the activation
        h = x.new_empty(R, two_f)
        moe_gemm(x, w13, h, plan, n=two_f, k=D, a_div=k, stride_bk=w13.stride(1), stride_bn=w13.stride(2),
                 parts_run=j, part_n=two_f // parts)
        act = swiglu(h, parts)  # [R, F]; the parts a row does not run hold garbage and are never read
    else:  # decode-sized: SwiGLU in the gate/up GEMM's epilogue (one kernel and one [R, 2F] round trip fewer)
        act = x.new_empty(R, F)
        moe_gemm(x, w13, act, plan, n=F, k=D, a_div=k, stride_bk=w13.stride(1), stride_bn=w13.stride(2),
                 parts_run=j, part_n=F // parts, swiglu_f=F // parts)
    out = (x.new_zeros if j is not None else x.new_empty)(R, D)  # rows of choices with nothing to run stay 0
    moe_gemm(act, w2, out, plan, n=D, k=F, a_div=1, stride_bk=w2.stride(1), stride_bn=w2.stride(2),
             weights=weights.reshape(-1).float().contiguous(), parts_run=j, part_k=F // parts)
    if not summed:
        return out.view(T, k, D)
    if x.is_cuda:
        from moestack.moe.fused_triton import sum_choices

        return sum_choices(out, k)
    return out.view(T, k, D).sum(dim=1)


_ONE_EXPERT_PLANS: dict[tuple[int, torch.device], AlignPlan] = {}


def few_rows_linear(x: torch.Tensor, w: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """x [T, K] @ w [N, K].T for at most BLOCK_M rows, through `fused_triton.moe_gemm` as a single expert: w is
    read once, in place. A batch-8 decode step's LM head on an H100 (bench/decode_pieces.py, 2026-12-07 14:34
    UTC): 206 us against cuBLAS's 220 at Qwen3-30B-A3B's 622 MB, 71 against 77 at OLMoE's. The plan (one block,
    rows past T padding) is built once per (T, device), so a CUDA graph capturing the call holds no plan kernels.
    splits > 1 (split-K, for a narrow N over a long K): the fp32 partial products [splits, T, N], which sum to
    the product; the next residual add sums them as it reads (`serve/norm_triton.add_rms_norm`)."""
    from moestack.moe.fused_triton import moe_gemm

    T, K = x.shape
    if T > BLOCK_M or w.numel() >= 2 ** 31 or w.shape[1] != K or x.dtype != w.dtype:
        raise ValueError(f"few_rows_linear: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} must be "
                         f"[T <= {BLOCK_M}, K] and [N, K] of one dtype, N x K < 2^31")
    plan = _ONE_EXPERT_PLANS.get((T, x.device))
    if plan is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # its tensors would be filled only on replay
            raise RuntimeError(f"few_rows_linear: first call for {T} rows inside a CUDA graph capture; run it once "
                               "before capturing (the engine's warm-up does)")
        rows = torch.arange(BLOCK_M, dtype=torch.int32, device=x.device)
        plan = AlignPlan(torch.where(rows < T, rows, T), torch.zeros(1, dtype=torch.int32, device=x.device),
                         torch.full((1,), BLOCK_M, dtype=torch.int32, device=x.device), T, 1, BLOCK_M)
        _ONE_EXPERT_PLANS[(T, x.device)] = plan
    x = x if x.stride(1) == 1 else x.contiguous()
    out = x.new_empty(T, w.shape[0]) if splits == 1 else x.new_empty(splits, T, w.shape[0], dtype=torch.float32)
    b = w.t().unsqueeze(0)  # [1, K, N]: strides (K, 1, K), only expert 0
    moe_gemm(x, b, out.view(-1, w.shape[0]), plan, n=w.shape[0], k=K, a_div=1, stride_bk=b.stride(1),
             stride_bn=b.stride(2), split=splits)
    return out


def few_rows_fit(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the serving paths take `few_rows_linear` for x @ w.T: half-precision rows of w's dtype (fp32 runs
    the kernel's slow full-precision dot), at most BLOCK_M of them (one block), N x K under 2^31 (the kernel's
    column offsets into w are 32-bit), where the Triton kernels run and no gradient is wanted."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype and x.shape[0] <= BLOCK_M
            and w.numel() < 2 ** 31 and fused_inference(x, w))


def few_rows_splits(n: int, k: int, sms: int) -> int:
    """Split-K for `few_rows_linear` of an [n, k] weight: doubled (up to 8) while the 64-column tiles times the
    splits stay within the SMs and each split keeps at least 512 of the reduction (a narrow out projection
    over a long K: 2048 x 4096 at Qwen3-30B-A3B gives 4 splits, 128 programs on an H100's 132 SMs)."""
    splits = 1
    while splits < 8 and -(-n // 64) * splits * 2 <= sms and k // (splits * 2) >= 512:
        splits *= 2
    return splits
