"""DualSparse dynamic tensor-level dropping: a dispatcher that runs only the kept parts of each expert.

It replaces an MoE layer's dispatcher once the layer's experts are `partition.PartExperts` (P parts per
expert). For every token-choice it estimates each sub-expert's (part's) contribution as
`routing weight x scale[e, p]` (scale: the part's calibrated output size per unit weight) and skips the
sub-expert computations scoring lowest. Skipped work is removed before the grouped GEMMs: a choice with
j kept parts runs a GEMM over its expert's first j parts only (in segment j of padded segments, see
`DualSparseDispatcher.dispatch`), and a choice with none is not sent. Uniform dropping uses one static
threshold: the calibration score distribution's (`table`) quantile at the target rate. Load-aware dropping
gives each EP rank its own rate from this batch's per-rank loads (`load_aware_rates`) and drops exactly
that fraction of the rank's lowest scores in this batch (a per-rank batch quantile: skewed loads also skew
the scores, so a calibrated table would miss).
Whole sub-expert dropping (`whole_rows`) is for memory-bound batches (decode): reading an expert's weights,
not multiplying them, sets the time there, and a sub-expert is read while any token of the batch keeps it, so
per-token drops at 25% of a batch of 64 (about 8 choices per expert at 64 experts, top-8) skip almost no
weights. Such a batch drops whole sub-experts instead, those of lowest summed score, up to the drop rate of the
batch's computations (`keep_whole_subexperts`): the same share of computations, each skipped one a weight read.
Notation: T = tokens, k = choices per token, E = experts, P = parts, G = EP ranks, N = kept rows, D = hidden.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.moe.dispatch import (Dispatched, Done, LocalDispatcher, expand_rows, inverse_order, unpermute,
                                  weighted_sum)
from moestack.moe.experts import fused_inference
from moestack.moe.router import Routing, count_ids

TABLE_SIZE = 1025  # points of the calibration score distribution kept per layer
# Padded segments hold P * T*k rows where packed rows need T*k: past this size the sync-free layout
# trades too much memory (e.g. a 64k-token Mixtral prefill: 2 x 128k x 4096 bf16 = 2 GiB).
PADDED_LIMIT_BYTES = 2 << 30


def quantile_table(scores: torch.Tensor, size: int = TABLE_SIZE) -> torch.Tensor:
    """`size` evenly spaced quantiles (0 .. 1) of the scores: [size] ascending."""
    s = scores.flatten().float().sort().values
    idx = (torch.linspace(0, 1, size, device=s.device) * (s.numel() - 1)).round().long()
    return s[idx]


def threshold_at(table: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Score thresholds dropping a fraction `rates` of the table's distribution; -inf where the rate is 0."""
    table = table.float()
    pos = rates.float().clamp(0, 1) * (table.numel() - 1)
    lo = pos.floor().long().clamp(max=table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    tau = table[lo] + (pos - lo) * (table[hi] - table[lo])
    return torch.where(rates > 0, tau, torch.full_like(tau, float("-inf")))


def load_aware_rates(loads: torch.Tensor, drop_rate: float, max_rate: float) -> torch.Tensor:
    """Per-rank drop rates [G] that drop `drop_rate` of all work while levelling the ranks' kept work.

    Water-filling: rank r keeps min(load_r, C), but at least load_r * (1 - max_rate); C is chosen so the
    kept total is (1 - drop_rate) of the load. So only the most loaded ranks drop, down to a common level.
    """
    L = loads.double()  # [G]
    cap = max(float(max_rate), float(drop_rate))
    lo, hi = L * (1 - cap), L
    target = (1 - drop_rate) * L.sum()
    cands = torch.cat([lo, hi]).sort().values  # [2G] breakpoints of the piecewise-linear kept(C)
    kept_at = torch.minimum(torch.maximum(cands[:, None], lo), hi).sum(dim=1)  # [2G], nondecreasing
    i = torch.searchsorted(kept_at, target.reshape(1)).clamp(1, cands.numel() - 1)[0]
    slope = (kept_at[i] - kept_at[i - 1]).clamp_min(1e-12)
    level = cands[i - 1] + (target - kept_at[i - 1]) * (cands[i] - cands[i - 1]) / slope
    kept = torch.minimum(torch.maximum(level, lo), hi)  # [G]
    rates = torch.where(L > 0, 1 - kept / L.clamp_min(1e-12), torch.full_like(L, drop_rate))
    return rates.to(loads.dtype if loads.is_floating_point() else torch.float32)


def keep_top_per_group(score: torch.Tensor, group: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Drop the lowest-scoring fraction `rates[g]` of each group's entries: keep mask [M] (score, group: [M])."""
    order = score.argsort()
    order = order[group[order].argsort(stable=True)]  # grouped, ascending score within a group
    sizes = count_ids(group, rates.numel())  # [G]
    starts = torch.cumsum(sizes, 0) - sizes
    n_drop = (rates.double() * sizes).round().long()  # [G]
    g = group[order]
    dropped = torch.arange(score.numel(), device=score.device) - starts[g] < n_drop[g]  # [M] in sorted order
    return torch.empty_like(dropped).scatter_(0, order, ~dropped)


RATE_BITS = 20  # whole sub-expert budgets take the rate as an integer of 2^-20: the kernel's sums then agree


def quantized_rate(rate: float) -> int:
    """The rate in units of 2^-RATE_BITS (what the whole sub-expert budget multiplies by)."""
    return round(rate * (1 << RATE_BITS))


def whole_budget(rate: float, computations):
    """Twice the computations whole sub-expert dropping may drop out of `computations` (int or int64 tensor),
    in integers: floor(2 x rate x computations) with the rate rounded to 2^-RATE_BITS."""
    return (quantized_rate(rate) * 2 * computations) >> RATE_BITS


def keep_whole_subexperts(score: torch.Tensor, sub: torch.Tensor, step: torch.Tensor, num_subs: int, steps: int,
                          rate: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask [M] dropping whole sub-experts per step: in each step (a batch), the sub-experts of lowest
    summed score, each dropped while at least half of it fits in `rate` of the step's computations (so the
    achieved rate is the target's nearest: a sub-expert at 64 experts, top-8, batch 64 is about 8 of 1024).

    score, sub, step: [M] each computation's score, sub-expert (expert * P + part) and step (0..steps-1);
    valid [M] bool: False for a CUDA graph's padding rows, which count nowhere (and are not kept).
    Ties go to the later part, so with parts stored largest first (scale[e, 0] >= scale[e, 1] ..., the same
    choices), an expert's later parts drop before its earlier ones: a choice's kept parts stay a prefix. No
    host sync (sorts and scatters of steps * num_subs entries), so a CUDA graph captures it.
    """
    n = steps * num_subs
    key = step * num_subs + sub  # [M]
    real = torch.ones_like(key, dtype=torch.bool) if valid is None else valid.bool()
    total = torch.zeros(n, dtype=torch.float32, device=score.device).index_add_(0, key, score.float() * real)
    size = torch.zeros(n, dtype=torch.int64, device=score.device).index_add_(0, key, real.long())  # per (step, sub)
    ids = torch.arange(n, device=score.device)
    order = torch.argsort(-(ids % num_subs), stable=True)  # later sub-experts (parts) first among equal totals
    order = order[torch.argsort(total[order], stable=True)]
    order = order[torch.argsort(order // num_subs, stable=True)]  # grouped by step, ascending total within
    cum = torch.cumsum(size[order], 0)  # [n]
    per_step = size.view(steps, num_subs).sum(dim=1)  # [steps]
    before = torch.cumsum(per_step, 0) - per_step  # computations of the earlier steps
    s = order // num_subs
    dropped = 2 * (cum - before[s]) - size[order] <= whole_budget(rate, per_step)[s]
    drop = torch.empty_like(dropped).scatter_(0, order, dropped)  # [n] by (step, sub-expert)
    return ~drop[key] & real


class ThenHandle:
    """A handle applying `fn` to another handle's result (once)."""

    def __init__(self, handle, fn):
        self.handle, self.fn, self.value, self.done = handle, fn, None, False

    def wait(self):
        if not self.done:
            self.value, self.done = self.fn(self.handle.wait()), True
        return self.value


def sort_by_parts(parts_run: torch.Tensor, slot: torch.Tensor, num_slots: int, parts: int):
    """Order rows for `PartExperts`: (order [R], counts [P, slots] rows per (parts run - 1, slot)).

    parts_run, slot: [R] parts to run (0..P) and expert slot of each row. Rows are sorted by (j, slot),
    j ascending, and rows with j = 0 sort last (PartExperts never reads them). No host sync.
    """
    key = torch.where(parts_run > 0, (parts_run - 1) * num_slots + slot, parts * num_slots)  # [R]
    order = torch.argsort(key, stable=True)
    counts = count_ids(key, parts * num_slots + 1)[: parts * num_slots].view(parts, num_slots)
    return order, counts


def segment_slots(parts_run: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row of each choice in padded segments [P, R] flattened: (j - 1) * R + its rank among the rows of
    segment j (in `sort_by_parts` order); P * R for choices with nothing to run. No host sync.

    parts_run [R] (0..P), order and counts [P, E] from `sort_by_parts(parts_run, ...)`.
    """
    R, P = parts_run.numel(), counts.shape[0]
    sizes = counts.sum(dim=1)  # [P]
    starts = torch.cumsum(sizes, 0) - sizes  # [P] first sorted position of each segment
    j = parts_run[order]  # [R] in sorted order
    seg = (j - 1).clamp(min=0)
    rank = torch.arange(R, device=order.device) - starts[seg]
    sorted_slot = torch.where(j > 0, seg * R + rank, torch.full_like(rank, P * R))
    return torch.empty_like(sorted_slot).scatter_(0, order, sorted_slot)


def work_per_expert(counts: torch.Tensor) -> torch.Tensor:
    """Sub-expert computations run per expert [E] from `sort_by_parts` counts [P, E] (a row of j parts is j)."""
    j = torch.arange(1, counts.shape[0] + 1, device=counts.device)
    return (counts * j.unsqueeze(1)).sum(dim=0)


class DualSparseDispatcher(nn.Module):
    """Dispatch each (token, expert) choice once, with how many of its expert's parts to run; the layer's
    `dispatcher` after sparsify (its experts are `partition.PartExperts`).

    A choice runs its expert's first j parts, j = the number of its P sub-expert computations that score
    above the threshold. Parts are stored in descending calibrated size, so for one choice the kept
    computations are the first ones (ties aside), and j counts exactly the computations kept.
    Single process; `moestack.inference.ep.EPDualSparseDispatcher` is the expert-parallel one.
    """

    def __init__(self, num_experts: int, parts: int):
        super().__init__()
        self.num_experts, self.parts = num_experts, parts
        self.register_buffer("scale", torch.ones(num_experts, parts))  # [E, P] output size per unit weight
        self.register_buffer("table", torch.zeros(TABLE_SIZE))  # calibration score quantiles
        self.register_buffer("expert_rank", torch.zeros(num_experts, dtype=torch.int64))  # [E] EP rank
        self.drop_rate, self.load_aware, self.num_ranks, self.max_rank_rate = 0.0, False, 1, 1.0
        # sub-expert computations asked for and run since the last reset: device scalars updated in place, so
        # counting costs no host sync and a CUDA graph replay of the layer counts too
        self.register_buffer("_stats", torch.zeros(2, dtype=torch.int64), persistent=False)  # asked, ran
        self._last_counts: torch.Tensor | None = None  # see `last_counts`
        self.full = LocalDispatcher(num_experts)  # at drop rate 0: the plain layer's dispatch, exactly
        self._tau: tuple | None = None  # (rate, table version, table address, threshold): see `threshold`
        self.padded_limit_bytes = PADDED_LIMIT_BYTES  # above it, dispatch packs rows (see `dispatch`)
        # "auto": padded segments where the Triton kernels run (they skip the padding), packed rows elsewhere
        # (eager SwiGLU and the CPU's grouped GEMM would compute the padding); "padded" / "packed" force one
        self.layout = "auto"
        # batches of at most this many choices (memory-bound: decode) drop whole sub-experts (see the module
        # doc); 0: every batch drops per token. `steps`: a batch holds that many batches' tokens interleaved
        # (token t in batch t % steps), to evaluate a [B, S] batch as what S decode steps of B tokens would drop
        self.whole_rows, self.steps = 0, 1
        # [T] 1 for real tokens, 0 for a captured batch's padding rows (the serving runner sets it per step from
        # its graph inputs): whole sub-expert drops leave the padding out of the sums and the budget
        self.valid: torch.Tensor | None = None

    @property
    def last_counts(self) -> torch.Tensor | None:
        """[P, E] rows that ran j = 1..P parts per expert in the last forward (None after a fused one)."""
        c = self._last_counts
        if c is not None and c.dim() == 1:  # drop rate 0: every row ran all P parts
            c = torch.cat([c.new_zeros(self.parts - 1, c.numel()), c.unsqueeze(0)])
        return c

    @last_counts.setter
    def last_counts(self, counts: torch.Tensor | None) -> None:
        self._last_counts = counts

    def threshold(self) -> float | None:
        """The uniform policy's score threshold at the current rate, as a host float: one sync when the rate
        or the table changed, none after. A CUDA graph captured at a rate keeps that rate's threshold (a
        kernel argument). None inside a capture that has not seen this rate (the caller uses the device)."""
        key = (self.drop_rate, self.table._version, self.table.data_ptr())
        if self._tau is None or self._tau[:3] != key:
            if self.table.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            rate = torch.full((1,), self.drop_rate, device=self.table.device)
            self._tau = (*key, float(threshold_at(self.table, rate)))
        return self._tau[3]

    def set_ranks(self, expert_rank: list[int]) -> None:
        """The EP rank of each global expert (a placement row), for load-aware dropping."""
        self.expert_rank.copy_(torch.as_tensor(expert_rank, dtype=torch.int64))
        self.num_ranks = max(expert_rank) + 1

    def set_policy(self, drop_rate: float, load_aware: bool = False, max_rank_rate: float | None = None,
                   whole_rows: int = 0) -> None:
        """Target fraction of sub-expert computations to skip; load-aware: per-rank rates from the loads;
        whole_rows: batches of at most that many choices drop whole sub-experts (0: none do)."""
        if load_aware and whole_rows:
            raise ValueError("load-aware dropping levels EP ranks per token; whole sub-expert dropping is for one "
                             "process's memory-bound batches: pick one")
        self.drop_rate, self.load_aware, self.whole_rows = float(drop_rate), bool(load_aware), int(whole_rows)
        default = (self.parts - 1) / self.parts if self.parts > 1 else 1.0
        self.max_rank_rate = max(float(drop_rate), default if max_rank_rate is None else float(max_rank_rate))

    def rank_rates(self, counts: torch.Tensor) -> torch.Tensor:
        """Drop rate of each EP rank [G] for this batch (uniform, or load-aware from the routed counts [E])."""
        if not self.load_aware:
            return torch.full((self.num_ranks,), self.drop_rate, device=counts.device)
        loads = torch.zeros(self.num_ranks, device=counts.device).index_add_(0, self.expert_rank, counts.float())
        return load_aware_rates(loads, self.drop_rate, self.max_rank_rate)

    def whole(self, routing: Routing) -> bool:
        """Whether this batch drops whole sub-experts (a memory-bound batch under `whole_rows`)."""
        return 0 < routing.expert_ids.numel() <= self.whole_rows * self.steps and self.drop_rate > 0

    def keep(self, routing: Routing) -> torch.Tensor | None:
        """Which sub-expert computations score high enough to run: [T*k*P] bool, or None for all of them."""
        if self.drop_rate <= 0:
            return None
        ids = routing.expert_ids  # [T, k]
        score = (routing.weights.unsqueeze(-1) * self.scale[ids]).flatten()  # [T*k*P]
        if self.whole(routing):
            T, k, P = *ids.shape, self.parts
            sub = (ids.unsqueeze(-1) * P + torch.arange(P, device=ids.device)).flatten()
            step = (torch.arange(T, device=ids.device) % self.steps).repeat_interleave(k * P)
            valid = self._valid(T)
            valid = None if valid is None else valid.bool().repeat_interleave(k * P)
            return keep_whole_subexperts(score, sub, step, self.num_experts * P, self.steps, self.drop_rate, valid)
        if not self.load_aware:  # one static threshold, calibrated to the target rate
            tau = self.threshold()
            if tau is None:  # computed on the device (a fill, not a host-to-device copy: no sync)
                tau = threshold_at(self.table, torch.full((1,), self.drop_rate, device=score.device))
            return score >= tau
        rank = self.expert_rank[ids].unsqueeze(-1).expand(*ids.shape, self.parts).flatten()  # [T*k*P]
        return keep_top_per_group(score, rank, self.rank_rates(routing.counts))

    def _valid(self, tokens: int) -> torch.Tensor | None:
        """`valid` when it describes this batch's `tokens` rows (a graph's step), else None (every row real)."""
        v = self.valid
        return v if v is not None and v.numel() == tokens else None

    def parts_to_run(self, routing: Routing) -> torch.Tensor:
        """How many parts (0..P) of its expert each choice runs: [T, k] int64 (its leading kept parts: the kept
        parts are a prefix by construction, and the count stays one where float sums tie otherwise)."""
        keep = self.keep(routing)
        if keep is None:
            return torch.full_like(routing.expert_ids, self.parts)
        return keep.view(*routing.expert_ids.shape, self.parts).long().cumprod(dim=-1).sum(dim=-1)

    def record(self, parts_run: torch.Tensor, routing: Routing | None = None) -> None:
        """Count the sub-expert computations asked for and run (parts_run: [choices] 0..P); with the batch's
        routing, a whole sub-expert batch's padding rows (`valid`) count nowhere (they ran nothing)."""
        real = self._valid(routing.expert_ids.shape[0]) if routing is not None and self.whole(routing) else None
        if real is None:
            self._stats[0].add_(parts_run.numel() * self.parts)
            self._stats[1].add_(parts_run.sum())
            return
        real = real.repeat_interleave(routing.expert_ids.shape[1])  # [choices]
        self._stats[0].add_(real.sum() * self.parts)
        self._stats[1].add_((parts_run.flatten() * real).sum())

    def record_all(self, choices: int) -> None:
        """Count `choices` choices that run every part (drop rate 0): one add, no reduction."""
        self._stats.add_(choices * self.parts)

    @property
    def total(self) -> int:
        """Sub-expert computations asked for since the last reset (reading it syncs with the device)."""
        return int(self._stats[0])

    @property
    def skipped(self) -> int:
        """Sub-expert computations skipped since the last reset (reading it syncs with the device)."""
        asked, ran = self._stats.tolist()
        return asked - ran

    def fused_parts(self, routing: Routing):
        """For `MoELayer.fused`: (P, parts each choice runs [T, k] or None for all), counted like a dispatch."""
        self.last_counts = None  # the fused path does not sort rows by (parts, expert)
        if self.drop_rate <= 0:
            self.record_all(routing.expert_ids.numel())
            return self.parts, None
        whole = self.whole(routing)
        if whole and self.steps == 1 and fused_inference(routing.weights):
            from moestack.moe.rows_triton import WHOLE_MAX, whole_parts_run

            if max(routing.expert_ids.numel(), self.num_experts * self.parts) <= WHOLE_MAX:  # one kernel too
                j = whole_parts_run(routing.weights, routing.expert_ids, self.scale, quantized_rate(self.drop_rate),
                                    RATE_BITS, self._stats, self._valid(routing.expert_ids.shape[0]))
                return self.parts, j
        tau = None if self.load_aware or whole else self.threshold()
        if tau is not None and fused_inference(routing.weights):  # one kernel: the parts and the counts
            from moestack.moe.rows_triton import parts_run

            j = parts_run(routing.weights.flatten(), routing.expert_ids.flatten(), self.scale, tau, self._stats)
            return self.parts, j.view(routing.expert_ids.shape)
        j = self.parts_to_run(routing)
        self.record(j.flatten(), routing)
        return self.parts, j

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """Rows in padded segments for `PartExperts`: [P, T*k, D], segment j - 1 holding the choices that
        run j parts, grouped by expert, then padding (a done handle). Choices with nothing to run get no row.

        No host sync: the segments have a fixed size (T*k rows, the most any can hold) and the grouped
        GEMMs take the valid row counts from the device, so the padding is never computed (on CUDA with the
        Triton kernels: `layout` "auto" uses segments only there). Elsewhere, when the segments would exceed
        `padded_limit_bytes` (a long prefill), or when a gradient is wanted (padding rows are undefined,
        their gradients too), the rows go packed instead: [T*k, D] sorted by (parts, expert), and
        `PartExperts` reads the segment sizes with one host sync.
        """
        # x: [T, D]
        T, k = routing.expert_ids.shape
        R, P = T * k, self.parts
        if self.layout not in ("auto", "padded", "packed"):
            raise ValueError(f"DualSparseDispatcher.layout={self.layout!r}: expected auto, padded or packed")
        if self.drop_rate <= 0:  # nothing dropped: the plain layer's rows, one GEMM pair over the whole experts
            d = self.full.dispatch(x, routing).wait()  # counts [E]: `PartExperts` runs all P parts
            self.record_all(R)
            self.last_counts = d.counts
            return Done(d)
        grad = torch.is_grad_enabled() and (x.requires_grad or routing.weights.requires_grad)
        padded = self.layout == "padded" or (self.layout == "auto" and fused_inference(x))
        small = P * R * x.shape[-1] * x.element_size() <= self.padded_limit_bytes
        if padded and small and fused_inference(x, routing.weights):  # no sort: two planning kernels
            return Done(self._plan_segments(x, routing))
        j = self.parts_to_run(routing).flatten()  # [R]
        order, counts = sort_by_parts(j, routing.expert_ids.flatten(), self.num_experts, P)
        self.record(j, routing)
        self.last_counts = counts
        sent = j > 0  # choices with a row the experts compute
        if grad or not padded or not small:  # one host sync
            inverse, _ = inverse_order(order, R)
            x_sorted = expand_rows(x, order, inverse, None, k)  # [R, D], rows with nothing to run last
            return Done(Dispatched(x_sorted, counts, order, R, routing.weights, inverse=inverse, sent=sent,
                                   extra={"packed": True}))
        slot = segment_slots(j, order, counts)  # [R] row in the flattened segments, P * R if none
        src = torch.zeros(P * R + 1, dtype=torch.long, device=x.device)
        src = src.scatter_(0, slot, torch.arange(R, device=x.device) // k)[: P * R]
        x_seg = x.index_select(0, src).view(P, R, x.shape[-1])  # padding rows copy token 0
        return Done(Dispatched(x_seg, counts, order, R, routing.weights, inverse=slot, sent=sent))

    def _plan_segments(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        """Padded segments through the Triton kernels (`rows_triton.plan_segments` / `place_rows`): one kernel
        counts each choice's parts and histograms the (parts, expert) groups, one places the rows; no sort.
        Within an expert's group the rows come in any order (each row is computed alone: same outputs)."""
        from moestack.moe.rows_triton import place_rows, plan_segments

        T, k = routing.expert_ids.shape
        P, E = self.parts, self.num_experts
        whole = self.whole(routing)
        tau = None if self.load_aware or whole else self.threshold()
        j = None if tau is not None else self.parts_to_run(routing).flatten()  # load-aware, whole, or in a capture
        stats = self._stats
        if whole:  # counted here, without a captured batch's padding rows
            self.record(j, routing)
            stats = torch.zeros_like(stats)
        key, hist = plan_segments(routing.weights.flatten(), routing.expert_ids.flatten(), self.scale,
                                  0.0 if tau is None else tau, stats, j)
        x_seg, slot = place_rows(x, key, hist, E, P, k)  # [P, R, D], [R]
        counts = hist[: P * E].view(P, E)
        self.last_counts = counts
        return Dispatched(x_seg, counts, None, T * k, routing.weights, inverse=slot)

    def combine(self, y: list[torch.Tensor], d: Dispatched):
        """Each token's sum of its expert outputs (kept parts only) times the gate values: [T, D]."""
        if d.counts.dim() == 1:  # drop rate 0: the plain layer's combine
            return self.full.combine(y, d)
        if d.extra.get("packed"):  # y: [M, D], the first M rows of the dispatch order (the choices with work)
            return Done(unpermute(y, d.order, d.weights, d.num_choices, d.inverse, d.sent))
        # y: P outputs [R, D], one per segment; choice c's row is y[slot // R][slot % R], slot P * R: none
        R = d.num_choices
        if fused_inference(y[0], *y[1:], d.weights) and len(y) <= 4:
            from moestack.moe.rows_triton import combine_segments

            return Done(combine_segments(y, d.inverse, d.weights))
        seg, pos = d.inverse // R, (d.inverse % R)  # a choice without a row reads row 0 of y[0], masked below
        per_choice = y[0].index_select(0, pos)
        for p in range(1, len(y)):  # where, not a multiply: the rows not selected may hold anything
            per_choice = torch.where((seg == p).unsqueeze(-1), y[p].index_select(0, pos), per_choice)
        return Done(weighted_sum(per_choice, d.weights, seg < len(y)))

    def achieved_rate(self) -> float:
        """Fraction of sub-expert computations skipped since the last reset."""
        total = self.total
        return self.skipped / total if total else 0.0

    def reset_stats(self) -> None:
        """Zero the skipped/total counters."""
        self._stats.zero_()
