"""Token rows into expert-ordered slots and weighted outputs back home, as Triton kernels (CUDA inference).

DualSparse (inference/dropping.py) uses both with P padded segments; the plain local dispatcher uses the
combine with one (P = 1). Callers pick them through `experts.fused_inference`. DualSparse also plans its
segments here without a sort: `plan_segments` counts the parts each choice runs and histograms the
(parts, expert) groups in one kernel, and `place_rows` gives each choice its slot (a counting sort by
atomics: within a group rows land in any order, which changes no output, since every row is computed
alone) while it copies the token row there.

Training uses them too (moe/dispatch.py, dropless rows on CUDA): `combine_segments` is the weighted
combine's forward and, with unit weights, the backward of the token expansion (each token's k row
gradients summed); `combine_backward` is the combine's backward in one pass per choice (the row's gradient
w x grad_out[t], written in expert order, and the weight's gradient y . grad_out[t]).

Eager PyTorch fills the P segments with one gather over all P * R rows (padding included) and brings the
outputs home with P gathers of R rows, a select per segment and a weighted sum: several passes over
[R, D] tensors. These kernels touch only the rows that exist: `place_rows` copies each choice's token
row to its slot once, and `combine_segments` reads each choice's output row once from its segment and
writes each token's weighted sum once (fp32 accumulation).
Notation: T = tokens, k = choices per token, R = T * k, P = parts (segments, at most 4 here), D = hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_SEGMENTS = 4


@triton.jit
def _combine(y0, y1, y2, y3, slot_ptr, w_ptr, out_ptr, stride_y, stride_o, R, D,
             K: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # one token
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kk in tl.static_range(K):
        s = tl.load(slot_ptr + t * K + kk)
        w = tl.load(w_ptr + t * K + kk).to(tl.float32)
        seg = s // R  # P for a choice without a row: no segment matches, it adds nothing
        off = (s % R) * stride_y + cols
        # a branch on the (uniform) segment, not P masked loads: one load is issued per choice
        if seg == 0:
            acc += w * tl.load(y0 + off, mask=m, other=0.0).to(tl.float32)
        if P > 1:
            if seg == 1:
                acc += w * tl.load(y1 + off, mask=m, other=0.0).to(tl.float32)
        if P > 2:
            if seg == 2:
                acc += w * tl.load(y2 + off, mask=m, other=0.0).to(tl.float32)
        if P > 3:
            if seg == 3:
                acc += w * tl.load(y3 + off, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _parts_of(w_ptr, ids_ptr, scale_ptr, offs, m, tau, P: tl.constexpr):
    """(expert, j) of choices offs: j = how many of the P scores weight x scale[e, p] (fp32) pass tau."""
    e = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    j = tl.zeros(offs.shape, dtype=tl.int32)
    for p in tl.static_range(P):
        s = tl.load(scale_ptr + e * P + p, mask=m, other=0.0)
        j += (w * s >= tau).to(tl.int32)
    return e, j


@triton.jit
def _count(stats_ptr, j, m, R, P: tl.constexpr):
    """stats += (parts asked for, parts run) of this program's choices."""
    tl.atomic_add(stats_ptr + 1, tl.sum(tl.where(m, j, 0), axis=0).to(tl.int64))
    if tl.program_id(0) == 0:
        tl.atomic_add(stats_ptr, tl.cast(R, tl.int64) * P)


@triton.jit
def _plan(w_ptr, ids_ptr, scale_ptr, j_ptr, key_ptr, hist_ptr, stats_ptr, R, tau, E,
          P: tl.constexpr, HAS_J: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < R
    if HAS_J:  # parts to run given (load-aware dropping)
        e = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
        j = tl.load(j_ptr + offs, mask=m, other=0).to(tl.int32)
    else:  # uniform: one threshold
        e, j = _parts_of(w_ptr, ids_ptr, scale_ptr, offs, m, tau, P)
    key = tl.where(j > 0, (j - 1) * E + e, P * E)  # group (j - 1, e); P * E: nothing to run
    tl.store(key_ptr + offs, key, mask=m)
    tl.atomic_add(hist_ptr + key, 1, mask=m)
    _count(stats_ptr, j, m, R, P)


@triton.jit
def _parts(w_ptr, ids_ptr, scale_ptr, j_ptr, stats_ptr, R, tau, P: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < R
    _, j = _parts_of(w_ptr, ids_ptr, scale_ptr, offs, m, tau, P)
    tl.store(j_ptr + offs, j, mask=m)
    _count(stats_ptr, j, m, R, P)


@triton.jit
def _whole_parts(w_ptr, ids_ptr, scale_ptr, valid_ptr, j_ptr, tot_ptr, cnt_ptr, flag_ptr, stats_ptr, R, K, NSUB,
                 rate_q, P: tl.constexpr, HAS_VALID: tl.constexpr, RATE_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                 NS: tl.constexpr):
    """One program: DualSparse's whole sub-expert drops of a decode batch (`dropping.keep_whole_subexperts`,
    one step). Sums each sub-expert's scores and counts its computations (atomics into scratch), sorts the
    sub-experts by one packed int64 key (total's fp32 bits, later sub-experts first among equal totals, size),
    drops them in that order while at least half of each fits in the budget (`dropping.whole_budget`, in
    integers), and gives each choice the number of leading parts it keeps. Padding rows (valid 0) count
    nowhere and run nothing."""
    g = tl.arange(0, NS)
    tl.store(tot_ptr + g, tl.zeros([NS], dtype=tl.float32))
    tl.store(cnt_ptr + g, tl.zeros([NS], dtype=tl.int32))
    tl.debug_barrier()
    offs = tl.arange(0, BLOCK_R)
    m = offs < R
    if HAS_VALID:  # a captured batch's padding tokens
        m = m & (tl.load(valid_ptr + offs // K, mask=m, other=0) != 0)
    e = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for p in tl.static_range(P):
        sc = tl.load(scale_ptr + e * P + p, mask=m, other=0.0)
        tl.atomic_add(tot_ptr + e * P + p, w * sc, mask=m)
        tl.atomic_add(cnt_ptr + e * P + p, tl.full([BLOCK_R], 1, tl.int32), mask=m)
    tl.debug_barrier()
    # the sums and counts from L2, where the atomics made them (.cg: not a line L1 may hold)
    tot = tl.maximum(tl.load(tot_ptr + g, cache_modifier=".cg"), 0.0)  # scores are >= 0; -0.0 would sort first
    cnt = tl.load(cnt_ptr + g, cache_modifier=".cg")
    bits = tot.to(tl.int32, bitcast=True).to(tl.int64)  # non-negative floats order as their bits do
    bits = tl.where(g < NSUB, bits, 0x7FFFFFFF)  # padding past E * P sorts last (above every finite float)
    key = (bits << 32) | ((NS - 1 - g).to(tl.int64) << 16) | cnt.to(tl.int64)
    key = tl.sort(key)
    size = (key & 0xFFFF).to(tl.int64)
    sub = NS - 1 - ((key >> 16) & 0xFFFF).to(tl.int32)
    cum = tl.cumsum(size, 0)
    computations = tl.sum(m.to(tl.int64), axis=0) * P
    limit = (rate_q.to(tl.int64) * 2 * computations) >> RATE_BITS  # twice the budget
    dropped = 2 * cum - size <= limit
    tl.store(flag_ptr + sub, dropped.to(tl.int32), mask=sub < NSUB)
    tl.debug_barrier()
    j = tl.zeros([BLOCK_R], dtype=tl.int32)
    alive = tl.full([BLOCK_R], 1, tl.int32)
    for p in tl.static_range(P):  # the leading kept parts (a prefix by the tie order; kept one regardless)
        alive = alive * (1 - tl.load(flag_ptr + e * P + p, mask=m, other=1))
        j += alive
    tl.store(j_ptr + offs, j, mask=offs < R)  # padding rows: 0 (alive died at their masked load)
    tl.atomic_add(stats_ptr + 1, tl.sum(tl.where(m, j, 0), axis=0).to(tl.int64))
    tl.atomic_add(stats_ptr, computations)


@triton.jit
def _place(x_ptr, key_ptr, hist_ptr, ends_ptr, cursor_ptr, slot_ptr, out_ptr, stride_x, stride_o, R, D, E,
           K: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)  # one choice
    q = tl.load(key_ptr + c)
    if q < P * E:
        s = q // E  # its segment: j - 1
        first = tl.load(ends_ptr + s * E - 1, mask=s > 0, other=0)  # rows of the segments before s
        rank = tl.atomic_add(cursor_ptr + q, 1)  # its place among its group's rows
        slot = s * R + (tl.load(ends_ptr + q) - tl.load(hist_ptr + q) - first) + rank
        tl.store(slot_ptr + c, slot)
        for c0 in range(0, D, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + (c // K) * stride_x + cols, mask=cols < D)
            tl.store(out_ptr + slot.to(tl.int64) * stride_o + cols, v, mask=cols < D)
    else:
        tl.store(slot_ptr + c, P * R)


@triton.jit
def _combine_bwd(y_ptr, g_ptr, slot_ptr, w_ptr, gy_ptr, gw_ptr, stride_gy, stride_g, stride_y, D,
                 K: tl.constexpr, WANT_W: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)  # one choice: token c // K, row slot[c] of y
    row = tl.load(slot_ptr + c)
    w = tl.load(w_ptr + c).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, D, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < D
        g = tl.load(g_ptr + (c // K) * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(gy_ptr + row * stride_gy + cols, (w * g).to(gy_ptr.dtype.element_ty), mask=m)
        if WANT_W:
            dot += tl.load(y_ptr + row * stride_y + cols, mask=m, other=0.0).to(tl.float32) * g
    if WANT_W:
        tl.store(gw_ptr + c, tl.sum(dot, axis=0))


def plan_segments(weights: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor, tau: float,
                  stats: torch.Tensor, parts_run: torch.Tensor | None = None):
    """(key [R] int32, counts [P * E + 1] int32) for choices with expert ids and weights [R]: key = (j - 1) * E
    + e for a choice running j of its expert's parts (j = its scores weight x scale[e, p] >= tau, or
    parts_run), P * E for none; counts: rows per key. Adds R * P to stats[0] and the parts run to stats[1]
    (int64 [2])."""
    R = ids.numel()
    E, P = scale.shape
    key = torch.empty(R, dtype=torch.int32, device=ids.device)
    counts = torch.zeros(P * E + 1, dtype=torch.int32, device=ids.device)
    if R:
        j = parts_run if parts_run is not None else key
        _plan[(triton.cdiv(R, BLOCK),)](weights.contiguous(), ids.contiguous(), scale.float().contiguous(),
                                        j.contiguous(), key, counts, stats, R, float(tau), E, P=P,
                                        HAS_J=parts_run is not None, BLOCK=BLOCK)
    return key, counts


def parts_run(weights: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor, tau: float,
              stats: torch.Tensor) -> torch.Tensor:
    """Parts each choice runs, j [R] int32 (its scores weight x scale[e, p] >= tau), in one kernel that also
    adds R * P to stats[0] and the parts run to stats[1] (the fused decode path's planning)."""
    R = ids.numel()
    E, P = scale.shape
    j = torch.empty(R, dtype=torch.int32, device=ids.device)
    if R:
        _parts[(triton.cdiv(R, BLOCK),)](weights.contiguous(), ids.contiguous(), scale.float().contiguous(), j,
                                         stats, R, float(tau), P=P, BLOCK=BLOCK)
    return j


WHOLE_MAX = 1024  # most choices (and sub-experts) `whole_parts_run` takes: one program holds them all


def whole_parts_run(weights: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor, rate_q: int, rate_bits: int,
                    stats: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Parts each choice runs, j [T, k] int32, when a decode batch (expert ids and weights [T, k]) drops whole
    sub-experts at the rate rate_q / 2^rate_bits (`dropping.keep_whole_subexperts` with one step; integers, so
    its budget is exactly `dropping.whole_budget`'s), in one kernel that also counts into stats like
    `parts_run`. valid [T]: 0 for padding tokens (they run nothing and count nowhere). At most WHOLE_MAX
    choices and sub-experts (E * P)."""
    T, k = ids.shape
    R = T * k
    E, P = scale.shape
    if R > WHOLE_MAX or E * P > WHOLE_MAX:
        raise ValueError(f"whole_parts_run takes up to {WHOLE_MAX} choices and sub-experts; got {R} and {E * P}")
    j = torch.empty(T, k, dtype=torch.int32, device=ids.device)
    if R:
        NS = max(triton.next_power_of_2(E * P), 16)
        scratch = torch.empty(3, NS, dtype=torch.int32, device=ids.device)  # totals (fp32 bits), counts, flags
        _whole_parts[(1,)](weights.contiguous(), ids.contiguous(), scale.float().contiguous(),
                           ids if valid is None else valid.contiguous(), j, scratch[0].view(torch.float32),
                           scratch[1], scratch[2], stats, R, k, E * P, rate_q, P=P, HAS_VALID=valid is not None,
                           RATE_BITS=rate_bits, BLOCK_R=max(triton.next_power_of_2(R), 16),
                           NS=NS, num_warps=4)
    return j


def place_rows(x: torch.Tensor, key: torch.Tensor, counts: torch.Tensor, num_experts: int, parts: int, k: int):
    """(padded segments [P, R, D], slot [R]) from `plan_segments`: segment j - 1 holds the rows running j
    parts grouped by expert (in any order within an expert), then padding (uninitialised, never read);
    slot[c] = (j - 1) * R + row, or P * R for a choice with nothing to run. No host sync."""
    x = x.contiguous()
    R, D = key.numel(), x.shape[1]
    out = x.new_empty(parts * R, D)
    slot = torch.empty(R, dtype=torch.int64, device=x.device)
    if R:
        ends = torch.cumsum(counts, 0, dtype=torch.int32)  # [P * E + 1] inclusive
        cursor = torch.zeros_like(counts)
        _place[(R,)](x, key, counts, ends, cursor, slot, out, x.stride(0), out.stride(0), R, D, num_experts,
                     K=k, P=parts, BLOCK=BLOCK)
    return out.view(parts, R, D), slot


def combine_segments(y: list[torch.Tensor], slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, D]: sum over each token's choices of weight x its output row (y[slot // R][slot % R])."""
    T, k = weights.shape
    R, D = y[0].shape
    if len(y) > MAX_SEGMENTS or any(t.stride() != y[0].stride() or t.shape != y[0].shape for t in y):
        raise ValueError(f"combine_segments takes up to {MAX_SEGMENTS} outputs of one shape and layout")
    if y[0].stride(1) != 1:
        y = [t.contiguous() for t in y]
    out = y[0].new_empty(T, D)
    if T and D:
        ys = list(y) + [y[0]] * (MAX_SEGMENTS - len(y))
        _combine[(T, triton.cdiv(D, BLOCK))](*ys, slot.contiguous(), weights.contiguous(), out, y[0].stride(0),
                                             out.stride(0), R, D, K=k, P=len(y), BLOCK=BLOCK)
    return out


def combine_backward(y: torch.Tensor | None, grad: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor):
    """Gradients of `combine_segments([y], slot, weights)` (one segment; slot a permutation of y's rows): (grad_y
    [N, D] in y's rows, grad_weights [T, k] in the weights' dtype, or None when y is None: not wanted)."""
    T, k = weights.shape
    grad = grad.contiguous()
    want_w = y is not None
    y = y.contiguous() if want_w else grad  # without y: a stand-in pointer the kernel does not read
    gy = grad.new_empty(T * k, grad.shape[1])
    gw = torch.empty(T, k, dtype=torch.float32, device=grad.device)
    if T * k and grad.shape[1]:
        _combine_bwd[(T * k,)](y, grad, slot.contiguous(), weights.contiguous(), gy, gw, gy.stride(0), grad.stride(0),
                               y.stride(0), grad.shape[1], K=k, WANT_W=want_w, BLOCK=BLOCK)
    return gy, (gw.to(weights.dtype) if want_w else None)
