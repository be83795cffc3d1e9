"""ReaLB: per EP rank and layer, run an overloaded, vision-dominated rank's experts in lower precision.

In multimodal prefill the vision tokens crowd onto some experts, so under expert parallelism a few ranks
get far more rows than the mean and the layer waits for them. ReaLB (arXiv 2604.19503) makes those
ranks faster instead of moving work: per layer, from the per-rank token counts the dispatch exchanges
anyway (and the share of vision tokens in them), it picks the ranks that are
- overloaded: load >= `load_ratio` x the mean rank load,
- vision-dominated: at least `modality` of their rows are vision tokens (text-heavy ranks stay BF16),
- in a large batch: at least `min_tokens` tokens in the layer's forward (decode and small batches: off),
- with big enough GEMMs: at least `min_expert_rows` rows per local expert (below that, quantizing the rows
  costs more than FP8 saves: measured on the H200, docs/methods/realb.md),
and converts their experts' BF16 weights to FP8 on the fly (FP4 numerics emulated for accuracy) into one
conversion buffer shared by all layers, on a side stream while the dispatch is in flight (the gate/up
weights first; the first GEMM waits for those alone, so the down weights' conversion also hides under
it), then runs FP8 grouped GEMMs with per-row / per-column scales (inference/lowp.py). No redundant
experts, no copy of the model: memory grows by one layer's (one rank's) fp8 experts, plus each layer's weight scales (one fp32 per
output column, 4 / d_in of the bf16 expert bytes), kept so that a conversion is one read and one write.
The FP8 rows are quantized once per token, before the dispatch (on one process; under EP the low rank
quantizes the rows it receives), and the down projection's input comes out of SwiGLU already in fp8.

Wiring (the experts seam of DESIGN.md): `apply_realb(model, cfg)` wraps each MoE layer's dispatcher in
`RealbDispatcher` (the decision and the conversion start at dispatch) and makes its experts
`RealbExperts` (the GEMMs), both sharing one `RealbState`. Under EP (`parallel/ep.py`'s EPDispatcher inside)
each rank decides for itself from loads all-reduced over the EP group; on one process `cfg.ranks` simulated
ranks (contiguous expert blocks) stand in, which is how the accuracy of the policy is measured.
The model marks its vision tokens with `set_modality(model, mask)` before a forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moestack.inference.lowp import cast_fp8, fp4_grouped_mm, fp8_experts, fp8_scales, quantize_fp8
from moestack.moe.experts import GroupedExperts
from moestack.moe.layer import MoELayer
from moestack.moe.router import Routing, count_ids

PRECISIONS = ("fp8", "fp4")


@dataclass
class RealbConfig:
    """ReaLB's thresholds. Defaults: modality 0.7 and min_tokens 2048 as the paper recommends; load_ratio
    from bench/realb.py on the H200 (docs/methods/realb.md)."""

    load_ratio: float = 1.15  # a rank is overloaded at load >= load_ratio x mean rank load
    modality: float = 0.7  # ... and low precision only if >= this share of its rows are vision tokens
    min_tokens: int = 2048  # off below this many tokens in a layer's forward
    precision: str = "fp8"  # fp8 (Hopper tensor cores) | fp4 (NVFP4 numerics, emulated: accuracy only)
    min_expert_rows: int = 1024  # ... and only if the rank has at least this many rows per local expert
    ranks: int = 0  # one process: simulated EP ranks (contiguous expert blocks); 0 = the EP group's size
    everywhere: bool = False  # every rank low, always (the FP8 / FP4-everywhere baselines)

    def __post_init__(self):
        if not self.load_ratio >= 1.0:
            raise ValueError(f"realb load_ratio={self.load_ratio}: must be >= 1 (a rank's load over the mean rank "
                             "load); 1.15 is the default")
        if not 0.0 <= self.modality <= 1.0:
            raise ValueError(f"realb modality={self.modality}: must be a share of vision tokens in [0, 1]; 0.7 is "
                             "the default (0 ignores modality)")
        if not (isinstance(self.min_tokens, int) and self.min_tokens >= 0):
            raise ValueError(f"realb min_tokens={self.min_tokens!r}: must be an int >= 0 (tokens per forward "
                             "below which ReaLB is off); 2048 is the default")
        if self.precision not in PRECISIONS:
            raise ValueError(f"realb precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if not (isinstance(self.min_expert_rows, int) and self.min_expert_rows >= 0):
            raise ValueError(f"realb min_expert_rows={self.min_expert_rows!r}: must be an int >= 0 (rows per local "
                             "expert below which FP8 does not pay); 1024 is the default")
        if not (isinstance(self.ranks, int) and self.ranks >= 0):
            raise ValueError(f"realb ranks={self.ranks!r}: must be an int >= 0 (0 = the EP group's size)")


def choose_ranks(loads: torch.Tensor, vision: torch.Tensor, tokens: int, cfg: RealbConfig,
                 experts_per_rank: int = 1) -> torch.Tensor:
    """Which ranks run low precision: bool [G] from rows per rank loads [G] and their vision rows [G]."""
    if cfg.everywhere:
        return torch.ones_like(loads, dtype=torch.bool)
    if tokens < cfg.min_tokens or loads.numel() < 2:
        return torch.zeros_like(loads, dtype=torch.bool)
    loads = loads.float()
    mean = loads.mean()
    share = vision.float() / loads.clamp(min=1)
    big = loads >= cfg.min_expert_rows * experts_per_rank  # small grouped GEMMs: FP8's row quantization costs more
    return (loads >= cfg.load_ratio * mean) & (loads > mean) & (share >= cfg.modality) & big


class ConversionBuffer:
    """One set of fp8 weights and scales reused by every layer of one shape (the paper's 'no extra memory'
    beyond one layer's conversion): room for one rank's experts, allocated on first use."""

    def __init__(self):
        self.tensors: dict[tuple, dict[str, torch.Tensor]] = {}
        self.allocations = 0  # how often memory was allocated (tests: no growth over layers and steps)

    def get(self, experts: int, w13: torch.Tensor, w2: torch.Tensor, slot: int = 0) -> dict[str, torch.Tensor]:
        """Buffers for `experts` experts shaped like w13 [*, D, 2F] and w2 [*, F, D]: q13 [n, 2F, D], s13 [n, 2F],
        q2 [n, D, F], s2 [n, D] (first n = experts). `slot`: ScMoE alternates two buffers (see apply_realb)."""
        key = (w13.shape[1:], w2.shape[1:], w13.device, slot)
        have = self.tensors.get(key)
        if have is None or have["q13"].shape[0] < experts:
            n = max(experts, w13.shape[0])  # room for all of a rank's experts: allocated once
            D, F2 = w13.shape[1:]
            F, _ = w2.shape[1:]
            dev = w13.device
            have = {"q13": torch.empty(n, F2, D, device=dev, dtype=torch.float8_e4m3fn),
                    "s13": torch.empty(n, F2, device=dev), "q2": torch.empty(n, D, F, device=dev,
                    dtype=torch.float8_e4m3fn), "s2": torch.empty(n, D, device=dev)}
            self.tensors[key] = have
            self.allocations += 1
        return {k: v[:experts] for k, v in have.items()}


class RealbState:
    """What a model's ReaLB layers share: config, conversion buffer, side stream, modality, decisions."""

    def __init__(self, cfg: RealbConfig):
        self.cfg = cfg
        self.buffer = ConversionBuffer()
        self.modality: torch.Tensor | None = None  # [T] bool, True = vision token (None: all text)
        self.decisions: list[dict] = []  # per layer forward: loads, vision shares, ranks chosen
        self.stream = None  # CUDA side stream for the conversion, made on first use
        self.installed: list[tuple] = []  # (layer, its own experts, its own dispatcher): what remove_realb restores
        self.slots = 1  # conversion buffers: 1, or 2 for ScMoE (layer i uses buffer i % slots)

    def take_decisions(self) -> list[dict]:
        """The decisions since the last call (metrics read and clear them)."""
        out, self.decisions = self.decisions, []
        return out


class RealbDispatcher:
    """Wraps a layer's dispatcher: decides the precision of this layer's local experts and starts their
    conversion before handing the rows to the inner dispatcher (whose all-to-all then hides it)."""

    def __init__(self, inner, experts: "RealbExperts", state: RealbState, layer_idx: int):
        self.inner, self.experts, self.state, self.layer_idx = inner, experts, state, layer_idx

    def __getattr__(self, name):  # everything else (num_experts, group, slots, ...) is the inner dispatcher's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def fused_parts(self, routing: Routing):
        """The fused small-batch kernels are bf16 only: they take batches ReaLB leaves alone."""
        plan = getattr(self.inner, "fused_parts", None)
        if plan is None or routing.expert_ids.shape[0] >= self.state.cfg.min_tokens:
            return None
        return plan(routing)

    def dispatch(self, x: torch.Tensor, routing: Routing):
        st = self.state
        small = getattr(self.inner, "group", None) is None and routing.expert_ids.shape[0] < st.cfg.min_tokens
        # one process and a small batch (decode, CUDA graphs): off without looking (no host sync); under EP
        # every rank takes part in the decision's all-reduce
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()  # graphs replay BF16 (no host syncs)
        self.experts.low = None if small or capturing else self.decide(routing)
        self.experts.rows8 = None
        if self.experts.low is None or not bool(self.experts.low.any()):
            return self.inner.dispatch(x, routing)
        # the dispatch is enqueued first and the conversion after it, waiting only for the work before the
        # dispatch: the all-to-all's kernel takes its SMs at once, the conversion fills the others (enqueued first,
        # the conversion's blocks would hold every SM and the dispatch would start only as they drain). Which
        # experts and which buffer come before `ready` (a host sync that must not wait for the dispatch, and
        # indices the side stream reads only once written).
        prepared = self.experts.prepare(st)
        ready = torch.cuda.current_stream(x.device).record_event() if x.is_cuda else None
        handle = self.inner.dispatch(x, routing)
        self.experts.convert(st, prepared, after=ready)
        if st.cfg.precision != "fp8" or getattr(self.inner, "group", None) is not None:
            return handle  # EP: the rows travel in bf16, the low rank quantizes what it receives
        # one process: each token quantized once (not once per routed row); the experts gather their fp8 rows
        return _TokensFp8(handle, self.experts, *quantize_fp8(x.detach(), dim=-1), routing.expert_ids.shape[1])

    def combine(self, y: torch.Tensor, d):
        return self.inner.combine(y, d)

    def decide(self, routing: Routing) -> torch.Tensor:
        """bool [E_local]: which local experts run low precision in this forward."""
        cfg, st = self.state.cfg, self.state
        E = routing.counts.numel()
        T, k = routing.expert_ids.shape
        mod = st.modality
        if mod is not None and mod.numel() != T:
            raise ValueError(f"ReaLB: the modality mask has {mod.numel()} entries but the layer routes {T} tokens; "
                             "call set_modality(model, mask) with one bool per token of this forward")
        vis_ids = routing.expert_ids[mod] if mod is not None else routing.expert_ids[:0]
        counts = torch.stack([routing.counts, count_ids(vis_ids.flatten(), E)])  # [2, E]
        tokens = torch.tensor([T], device=counts.device)
        group = getattr(self.inner, "group", None)
        if group is not None:  # EP: every rank sees the global loads (one all-reduce of 2E + 1 numbers)
            both = torch.cat([counts.flatten(), tokens])
            dist.all_reduce(both, group=group)
            counts, tokens = both[:-1].view(2, E), both[-1:]
        n_tokens = int(tokens)
        if n_tokens < cfg.min_tokens and not cfg.everywhere:  # off, and not a decision worth recording
            return torch.zeros(len(self.experts.global_ids), dtype=torch.bool, device=counts.device)
        rank_of = self.rank_of_expert(E, counts.device)  # [E]
        G = int(rank_of.max()) + 1
        per_rank = torch.zeros(2, G, dtype=counts.dtype, device=counts.device).index_add_(1, rank_of, counts)
        ranks = choose_ranks(per_rank[0], per_rank[1], n_tokens, cfg, E // G)  # [G]
        low_global = ranks[rank_of]  # [E]
        st.decisions.append({"layer": self.layer_idx, "loads": per_rank[0].tolist(),
                             "vision": per_rank[1].tolist(), "tokens": n_tokens,
                             "low_ranks": ranks.nonzero().flatten().tolist()})
        ids = torch.tensor(self.experts.global_ids, device=counts.device)
        return low_global[ids]

    def rank_of_expert(self, E: int, device) -> torch.Tensor:
        if getattr(self.inner, "group", None) is not None:  # EP: from the dispatcher's slots
            bounds = torch.tensor(self.inner.slots, device=device).cumsum(0)
            return torch.bucketize(self.inner.dest.to(device), bounds, right=True)
        G = self.state.cfg.ranks or 1
        if E % G:
            raise ValueError(f"ReaLB: ranks={G} simulated EP ranks do not divide the {E} experts; pick a divisor of {E}")
        return torch.arange(E, device=device) // (E // G)


class _TokensFp8:
    """A dispatch handle that also hands the experts each token's fp8 row and scale, and which token each
    dispatched row is (the rows' order is only known once the dispatch is done)."""

    def __init__(self, inner, experts: "RealbExperts", xq: torch.Tensor, scale: torch.Tensor, k: int):
        self.inner, self.experts, self.xq, self.scale, self.k = inner, experts, xq, scale, k

    def wait(self):
        d = self.inner.wait()
        self.experts.rows8 = (self.xq, self.scale, d.order[:d.x.shape[0]] // self.k)  # [T, D], [T], [N]
        return d


class RealbExperts(GroupedExperts):
    """GroupedExperts whose experts marked `low` (by RealbDispatcher) run FP8 (or emulated FP4) GEMMs."""

    def __init__(self, experts: GroupedExperts, state: RealbState):
        nn.Module.__init__(self)
        self.num_experts, self.d_model, self.d_ff, self.impl = (experts.num_experts, experts.d_model, experts.d_ff,
                                                                experts.impl)
        self.w13, self.w2 = experts.w13, experts.w2  # the same Parameters: state-dict keys do not change
        self.global_ids = experts.global_ids
        self._grouped_ok = experts._grouped_ok
        self.state = state
        self.low: torch.Tensor | None = None  # [E_local] bool, set per forward by the dispatcher
        self.converted: dict[str, torch.Tensor] | None = None
        self.rows8: tuple | None = None  # (token fp8 rows [T, D], scales [T], token of each row [N]), or None
        self.scales: dict | None = None  # the weights' fp8 column scales, kept while the weights are unchanged
        self.done: tuple | None = None  # CUDA events: q13 converted, q2 converted (the GEMMs wait on them)
        self.layer_idx = 0  # which conversion buffer it uses (set by apply_realb)

    def prepare(self, st: RealbState) -> tuple[torch.Tensor, dict] | None:
        """The low experts' indices and the conversion buffer they go to (None: nothing to convert, FP4 being
        emulated inside the GEMM). Reads the count of low experts on the host: call it before the dispatch."""
        if st.cfg.precision != "fp8":
            return None
        idx = self.low.nonzero().flatten()
        return idx, st.buffer.get(idx.numel(), self.w13, self.w2, self.layer_idx % st.slots)

    def convert(self, st: RealbState, prepared: tuple[torch.Tensor, dict] | None = None,
                after: "torch.cuda.Event | None" = None) -> None:
        """Quantize the low experts' weights into the shared buffer (FP8), on a side stream on CUDA, after the
        event `after` (default: all work on the current stream so far); `prepared`: from `prepare`, made
        before `after` was recorded (default: prepared here)."""
        if st.cfg.precision != "fp8":
            return  # FP4 is emulated inside the GEMM
        idx, buf = prepared if prepared is not None else self.prepare(st)
        if self.w13.is_cuda:
            if st.stream is None:
                st.stream = torch.cuda.Stream(self.w13.device)
            if after is None:  # weights ready, buffer free
                after = torch.cuda.current_stream(self.w13.device).record_event()
            st.stream.wait_event(after)
            idx.record_stream(st.stream)
            with torch.cuda.stream(st.stream):  # the gathered copies live (and are freed) on the side stream
                self.done = self._quantize(idx, buf, events=True)
        else:
            self._quantize(idx, buf)
        self.converted = buf

    def weight_scales(self) -> dict[str, torch.Tensor]:
        """fp8 column scales of all local experts, s13 [E, 2F] and s2 [E, D]: computed on first use and again
        only when the weights change (their version counters move: load_state_dict, an in-place update)."""
        w13, w2 = self.w13.detach(), self.w2.detach()
        key = (w13.data_ptr(), self.w13._version, w2.data_ptr(), self.w2._version)
        if self.scales is None or self.scales["key"] != key:
            self.scales = {"key": key, "s13": fp8_scales(w13, dim=-2), "s2": fp8_scales(w2, dim=-2)}
        return self.scales

    def _quantize(self, idx: torch.Tensor, buf: dict[str, torch.Tensor], events: bool = False) -> tuple | None:
        """The experts idx into buf: with the scales known, one cast kernel per weight (read bf16, write fp8),
        gate/up first. events: on CUDA, return (q13 done, q2 done) events recorded on the current stream."""
        sc = self.weight_scales()
        sub = idx.numel() < self.w13.shape[0]  # simulated ranks on one process: some of the experts
        done = []
        for name, w in (("13", self.w13.detach()), ("2", self.w2.detach())):
            s = sc["s" + name]
            buf["s" + name].copy_(s[idx] if sub else s)
            cast_fp8(w[idx] if sub else w, buf["s" + name], dim=-2, out=buf["q" + name], transpose=True)
            if events:
                done.append(torch.cuda.Event())
                done[-1].record()
        return tuple(done) if events else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        low, rows8 = self.low, self.rows8
        self.low = self.rows8 = None
        if low is None or not bool(low.any()):
            return super().forward(x, counts)
        if bool(low.all()):  # an EP rank: all its experts share one precision
            return self._low(x, counts, low, _pick(rows8, None))
        # simulated ranks on one process: low experts' rows first, then the rest, then back in place
        eid = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)  # [N]
        order = torch.argsort((~low[eid]).to(torch.int64) * counts.numel() + eid, stable=True)
        xs = x[order]
        n_low = int(counts[low].sum())
        y_low = self._low(xs[:n_low], counts[low], low, _pick(rows8, order[:n_low]))
        y_high = self.run(xs[n_low:], counts.masked_fill(low, 0), self.w13, self.w2)  # low experts: empty groups
        return y_high.new_empty(x.shape[0], y_high.shape[1]).index_copy_(
            0, order, torch.cat([y_low.to(y_high.dtype), y_high]))

    def _low(self, x: torch.Tensor, counts: torch.Tensor, low: torch.Tensor,
             rows8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The low experts on their rows x [n, D]; rows8: those rows in fp8 with their scales [n], when the
        dispatcher quantized the tokens already, else None (the rows are quantized here)."""
        from moestack.moe.experts import swiglu

        st = self.state
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        if st.cfg.precision == "fp4":
            w13, w2 = (self.w13, self.w2) if bool(low.all()) else (self.w13[low], self.w2[low])
            h = fp4_grouped_mm(x.to(dtype), w13.to(dtype), counts)
            return fp4_grouped_mm(swiglu(h).contiguous(), w2.to(dtype), counts)
        buf = self.converted
        wait_down = None
        if x.is_cuda and self.done is not None:  # the first GEMM waits for q13 only, the second for q2
            main = torch.cuda.current_stream(x.device)
            done13, done2 = self.done
            main.wait_event(done13)
            wait_down = lambda: main.wait_event(done2)  # noqa: E731
        x_scale = None
        if rows8 is not None:  # the dispatcher's per-token fp8 rows: the same values quantizing x would give
            x, x_scale = rows8
        y = fp8_experts(x, counts, buf["q13"], buf["s13"], buf["q2"], buf["s2"], dtype, x_scale, wait_down)
        if x.is_cuda:  # the next layer's conversion writes the buffer only after these GEMMs read it
            st.stream.wait_stream(torch.cuda.current_stream(x.device))
        return y


def _pick(rows8: tuple | None, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp8 values and scales of the dispatched rows `rows` (None: all) from the per-token ones in rows8."""
    if rows8 is None:
        return None
    xq, scale, tokens = rows8
    if rows is not None:
        tokens = tokens[rows]
    return xq.index_select(0, tokens), scale.index_select(0, tokens)


def apply_realb(model: nn.Module, cfg: RealbConfig | None = None) -> RealbState:
    """Install ReaLB on every MoE layer of model (moestack or a serving model); returns the shared state."""
    cfg = cfg or RealbConfig()
    state = RealbState(cfg)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("apply_realb: the model has no MoE layers")
    cfg_model = getattr(getattr(model, "cfg", None), "model", None)
    spec = getattr(model, "spec", None)
    if getattr(cfg_model, "arch", None) == "scmoe" or getattr(spec, "scmoe", False):
        # ScMoE launches block i+1's dispatch (and so its conversion) before block i's experts run: two buffers,
        # alternating by layer, keep block i's weights until its GEMMs have read them
        state.slots = 2
    for i, layer in enumerate(layers):
        if isinstance(layer.dispatcher, RealbDispatcher):
            raise ValueError("apply_realb: ReaLB is already installed on this model")
        if type(layer.experts) is not GroupedExperts:
            raise ValueError(f"apply_realb: layer {i} has {type(layer.experts).__name__} experts; ReaLB runs on "
                             "plain GroupedExperts (install it before DualSparse or FSSDP, not with them)")
        state.installed.append((layer, layer.experts, layer.dispatcher))
        layer.experts = RealbExperts(layer.experts, state)
        layer.experts.layer_idx = i
        layer.dispatcher = RealbDispatcher(layer.dispatcher, layer.experts, state, i)
    model.realb = state
    return state


def remove_realb(model: nn.Module) -> None:
    """Undo apply_realb: every MoE layer gets its own experts and dispatcher back."""
    state = getattr(model, "realb", None)
    if state is None:
        raise ValueError("remove_realb: ReaLB is not installed on this model")
    for layer, experts, dispatcher in state.installed:
        layer.experts, layer.dispatcher = experts, dispatcher
    del model.realb


def set_modality(model: nn.Module, vision: torch.Tensor | None) -> None:
    """Mark the vision tokens of the next forward: bool [B, S] or [T] (None: all text)."""
    state = getattr(model, "realb", None)
    if state is None:
        raise ValueError("set_modality: ReaLB is not installed on this model (call apply_realb first)")
    state.modality = None if vision is None else vision.reshape(-1).bool()


def summarize(decisions: list[dict]) -> dict:
    """Totals over decisions: layer forwards seen, forwards with a low rank, mean ranks lowered, max/mean."""
    if not decisions:
        return {"realb_layers": 0, "realb_low_layers": 0, "realb_low_ranks": 0.0, "realb_max_mean": 0.0}
    low = [len(d["low_ranks"]) for d in decisions]
    mm = [max(d["loads"]) / max(sum(d["loads"]) / len(d["loads"]), 1e-9) for d in decisions]
    return {"realb_layers": len(decisions), "realb_low_layers": sum(1 for n in low if n),
            "realb_low_ranks": sum(low) / len(low), "realb_max_mean": sum(mm) / len(mm)}


def parse_realb(spec: str) -> RealbConfig:
    """A RealbConfig from the command line's `--realb [KEY=VALUE,...]` ('' = the defaults)."""
    fields = {f: type(v) for f, v in asdict(RealbConfig()).items()}
    kwargs = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--realb {spec!r}: expected KEY=VALUE pairs separated by commas with KEY one of "
                             f"{', '.join(fields)} (e.g. --realb ranks=8,load_ratio=1.2)")
        kind = fields[key]
        try:
            kwargs[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--realb {key}={value!r}: not a valid {kind.__name__}") from None
    return RealbConfig(**kwargs)
