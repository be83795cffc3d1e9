"""The fused MoE GEMM: token gather in the prologue, routing weight in the epilogue (Triton, inference).

One kernel runs every expert's GEMM over blocks of BLOCK_M expert-sorted rows, the shape of vLLM's and
SGLang's fused_moe: row r of a block is an *entry* id, each block belongs to one expert, and the A
rows are read straight from the token matrix (`entry // a_div`), so no permuted copy of the tokens exists.
The output row of an entry is written at the entry's own index (choice order), optionally times its
routing weight, so the combine is a sum over each token's entries. DualSparse's parts are prefixes of an
expert's weights: given each entry's parts to run, a block skips the column tiles (gate/up) and the
reduction rows (down) of parts none of its rows runs, and each row's product stops at its own parts.
Padding rows carry the sentinel `num_valid`; blocks past the device-side padded total return at once, so
the grid is a static upper bound and nothing syncs with the host (CUDA-graph safe).
Notation: R = entries, K = reduction size, N = output width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, w_ptr, j_ptr, sorted_ptr, block_expert_ptr, total_ptr,
              N, K, num_valid, stride_am, stride_be, stride_bk, stride_bn, stride_cm, R_BUCKET, PART,
              A_DIV: tl.constexpr, MUL_W: tl.constexpr, PARTS_N: tl.constexpr, PARTS_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
              SWIGLU: tl.constexpr = False, SPLIT: tl.constexpr = 1):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    total = tl.load(total_ptr)
    if pid_m * BLOCK_M < total:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        entry = tl.load(sorted_ptr + rows).to(tl.int64)  # [BLOCK_M]; num_valid marks padding
        valid = entry < num_valid
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        b_base = b_ptr + e * stride_be
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ncheck = cols < N
        b_cols = cols
        if SWIGLU:  # output column c = part p, neuron i reads B's gate column p 2f + i and up column + f (f = PART)
            b_cols = cols + (cols // PART) * PART
        a_rows = a_ptr + (entry // A_DIV) * stride_am
        k_end = K
        k_start = 0
        if SPLIT > 1:  # split-K: this program's run of the reduction, its fp32 partial product in slab pid_k of c
            k_start = tl.program_id(2) * tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
            k_end = tl.minimum(K, k_start + tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K)
            c_ptr += tl.program_id(2).to(tl.int64) * num_valid * stride_cm
        if PARTS_N or PARTS_K:  # DualSparse: row r runs the first j_r parts (PART columns or rows of B each)
            j = tl.load(j_ptr + entry, mask=valid, other=0)  # [BLOCK_M]
            need = tl.max(j, axis=0) * PART  # the block's rows need B's first `need` columns / rows
            if PARTS_N:  # a tile of parts no row runs reads nothing (it stores zeros, never read)
                k_end = tl.where(pid_n * BLOCK_N < need, K, 0)
            if PARTS_K:
                k_end = tl.minimum(need, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kcheck = ks < K
            a_mask = valid[:, None] & kcheck[None, :]
            if PARTS_K:  # each row's product stops at its own parts (the rest of its A row is garbage)
                a_mask = a_mask & (ks[None, :] < (j * PART)[:, None])
            a = tl.load(a_rows[:, None] + ks[None, :], mask=a_mask, other=0.0)
            b_ptrs = b_base + ks[:, None] * stride_bk + b_cols[None, :] * stride_bn
            b_mask = kcheck[:, None] & ncheck[None, :]
            acc += tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), input_precision=PREC)
            if SWIGLU:
                acc_up += tl.dot(a, tl.load(b_ptrs + PART * stride_bn, mask=b_mask, other=0.0), input_precision=PREC)
        if SWIGLU:  # gate and up rounded to the output dtype first, as the unfused GEMM stores them
            g = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
            acc = g * tl.sigmoid(g) * acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        if MUL_W:
            w = tl.load(w_ptr + entry, mask=valid, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        tl.store(c_ptr + entry[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & ncheck[None, :])


def precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: fp32 inputs multiply in full fp32 ("ieee", as torch's matmul does by
    default), so the fused paths match the eager ones; bf16/fp16 use the tensor cores as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


# Decode-sized GEMMs read each routed expert's weights once and are memory-bound: the best tile depends on
# the shape and on how many rows each expert gets, so on a GPU the kernel is autotuned per (N, K, rows
# bucket, DualSparse parts or not) among these (the first call of each bucket measures them; CUDA-graph
# warm-up runs it).
TUNE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bn, bk, w, st in ((64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3),
                                      (128, 128, 8, 4), (256, 64, 8, 3), (32, 128, 4, 4), (64, 256, 4, 3))]
_moe_gemm_tuned = triton.autotune(TUNE_CONFIGS, key=["N", "K", "R_BUCKET", "PARTS_N", "PARTS_K", "SWIGLU", "SPLIT"],
                                  warmup=5, rep=20)(_moe_gemm)
# Prefill-sized batches (blocks of fused.BLOCK_M_LARGE rows) are compute-bound: wider tiles, more stages.
LARGE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in ((128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3),
                                       (64, 128, 4, 4), (256, 32, 8, 4))]
_moe_gemm_large = triton.autotune(LARGE_CONFIGS, key=["N", "K", "R_BUCKET", "PARTS_N", "PARTS_K", "BLOCK_M", "SWIGLU"],
                                  warmup=5, rep=20)(_moe_gemm)


def moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, plan, *, n: int, k: int, a_div: int,
             stride_bk: int, stride_bn: int, weights: torch.Tensor | None = None,
             parts_run: torch.Tensor | None = None, part_n: int = 0, part_k: int = 0, swiglu_f: int = 0,
             split: int = 1) -> None:
    """out[entry] = a[entry // a_div] @ B_e (times weights[entry]) for every valid entry, B_e = b[e] of the
    entry's block. With parts_run [entries] (DualSparse): only the first parts_run x part_n output columns
    (part_n > 0) or the products over B's first parts_run x part_k rows (part_k > 0) count for a row.
    swiglu_f > 0: B's columns are per part (swiglu_f gate, swiglu_f up) and out [entries, n] is their SwiGLU
    activation (`experts.swiglu` of the product), n = parts x swiglu_f; part_n is then swiglu_f.
    split > 1 (split-K, decode-sized plans): out is fp32 [split, entries, n], slab s the product over the s-th run
    of the reduction (their sum is the product), for a consumer that sums them as it reads."""
    if swiglu_f and (weights is not None or part_k or (parts_run is not None and part_n != swiglu_f)):
        raise ValueError("moe_gemm: swiglu_f is the gate/up GEMM's epilogue (no weights, no part_k, part_n = swiglu_f)")
    if split > 1 and (weights is not None or parts_run is not None or swiglu_f or plan.large
                      or out.dtype != torch.float32 or out.shape[0] != split * plan.num_valid):
        raise ValueError("moe_gemm: split-K takes a decode-sized plan, no weights, parts or SwiGLU, and an fp32 "
                         "out of split x entries rows")
    w = weights if weights is not None else out
    j = parts_run if parts_run is not None else plan.sorted_ids
    args = (a, b, out, w, j, plan.sorted_ids, plan.block_expert, plan.total, n, k, plan.num_valid,
            a.stride(0), b.stride(0), stride_bk, stride_bn, out.stride(0),
            min(triton.next_power_of_2(plan.num_valid), 1 << 20 if plan.large else 4096), max(part_n, part_k, swiglu_f, 1))
    flags = dict(A_DIV=a_div, MUL_W=weights is not None, PARTS_N=parts_run is not None and part_n > 0,
                 PARTS_K=parts_run is not None and part_k > 0, BLOCK_M=plan.block_m, PREC=precision(a),
                 SWIGLU=swiglu_f > 0, SPLIT=split)
    if a.is_cuda:
        kernel = _moe_gemm_large if plan.large else _moe_gemm_tuned
        kernel[lambda meta: (plan.num_blocks, triton.cdiv(n, meta["BLOCK_N"]), split)](*args, **flags)
    else:  # Triton's interpreter (CPU tests): one small tile
        block = 64 if n >= 64 else 16
        _moe_gemm[(plan.num_blocks, triton.cdiv(n, block), split)](*args, **flags, BLOCK_N=block, BLOCK_K=min(block, 32))


@triton.jit
def _sum_choices(x_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(x_ptr + (t * K + j) * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def sum_choices(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [T * k, D] (each token's k weighted expert rows, contiguous) -> their sums [T, D] (accumulated in fp32,
    returned in x's dtype). On CUDA, torch's sum over the middle dim of [T, k, D] took 4.9 us in a batch-8 decode
    step at OLMoE's shapes on an H100 (bench/suite.sh profile_decode, 2026-12-07); this one 2.3 us."""
    R, D = x.shape
    out = x.new_empty(R // k, D)
    if R:
        block = min(1024, triton.next_power_of_2(D))
        _sum_choices[(R // k, triton.cdiv(D, block))](x, out, D, K=k, BLOCK_D=block)
    return out


@triton.jit
def _align(ids_ptr, rank_ptr, sorted_ptr, block_expert_ptr, total_ptr, R, E, cap, num_blocks,
           BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr, CH: tl.constexpr, FILL: tl.constexpr):
    e = tl.arange(0, E_BLOCK)
    em = (e < E)[None, :]
    counts = tl.zeros([E_BLOCK], dtype=tl.int32)
    for start in range(0, R, CH):  # each entry's rank among its expert's entries (entry order), and the counts
        r = start + tl.arange(0, CH)
        ids = tl.load(ids_ptr + r, mask=r < R, other=E)
        onehot = ((ids[:, None] == e[None, :]) & em).to(tl.int32)  # entries not to run (id E): no column
        running = tl.cumsum(onehot, axis=0) + counts[None, :]
        tl.store(rank_ptr + r, tl.sum(onehot * (running - 1), axis=1), mask=r < R)
        counts += tl.sum(onehot, axis=0)
    starts = plan_blocks(counts, e < E, sorted_ptr, block_expert_ptr, total_ptr, R, E, cap, num_blocks,
                         BLOCK_M=BLOCK_M, FILL=FILL, CH=CH)  # the barrier in it covers the ranks too
    for start in range(0, R, CH):
        r = start + tl.arange(0, CH)
        ids = tl.load(ids_ptr + r, mask=r < R, other=E)
        onehot = ((ids[:, None] == e[None, :]) & em).to(tl.int32)
        dest = tl.sum(onehot * starts[None, :], axis=1) + tl.load(rank_ptr + r, mask=r < R, other=0)
        tl.store(sorted_ptr + dest, r.to(tl.int32), mask=(r < R) & (ids < E))


@triton.jit
def plan_blocks(counts, em, sorted_ptr, block_expert_ptr, total_ptr, sentinel, E, cap, num_blocks,
                BLOCK_M: tl.constexpr, FILL: tl.constexpr, CH: tl.constexpr):
    """A plan's blocks from its experts' entry counts [E_BLOCK] (em: which are experts), inside a single-program
    kernel: each expert padded to BLOCK_M rows, the padded total, each block's expert, every row of sorted_ptr
    [cap] set to the sentinel; then a barrier, so the caller's entries land after the fill. Returns each
    expert's first row, where the caller stores its entries (their rank among the expert's entries past it)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    tl.store(total_ptr, tl.sum(padded, axis=0))
    for start in range(0, num_blocks, CH):  # a block's expert: how many experts' rows end at or before it
        b = start + tl.arange(0, CH)
        ends = tl.sum(((pad_end[None, :] <= (b * BLOCK_M)[:, None]) & em[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.minimum(ends, E - 1), mask=b < num_blocks)
    for start in range(0, cap, FILL):  # padding rows hold the sentinel
        c = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + c, tl.full([FILL], 0, tl.int32) + sentinel, mask=c < cap)
    tl.debug_barrier()  # everything above is written before any thread reads or overwrites it
    return pad_end - padded


def align(ids: torch.Tensor, num_experts: int, block_m: int, cap: int):
    """`fused.align`'s plan in one single-program kernel (decode steps' sizes: fused.ALIGN_MAX_EXPERTS): (sorted
    entry ids [cap] int32, block experts [cap // block_m] int32, padded total [1] int32), the eager plan's. The compiled eager plan ran as five kernels, 10-13 us per layer of a
    batch-8 decode step on an H100 (bench/suite.sh profile_decode, 2026-12-07)."""
    R, dev = ids.numel(), ids.device
    e_block = triton.next_power_of_2(num_experts)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    rank = torch.empty(max(R, 1), dtype=torch.int32, device=dev)
    _align[(1,)](ids.contiguous(), rank, sorted_ids, block_expert, total, R, num_experts, cap, cap // block_m,
                 BLOCK_M=block_m, E_BLOCK=e_block, CH=max(16, 4096 // e_block), FILL=1024, num_warps=4)
    return sorted_ids, block_expert, total
