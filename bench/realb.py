"""ReaLB on a multimodal MoE: accuracy of the trained digits VLM (CPU) and MoE-layer speed (one H200).

    python3 bench/realb.py --study accuracy          # CPU, ~10 min: trains (or reuses) two VLMs, writes traces
    python3 bench/realb.py --study speed             # GPU: per-rank GEMMs at Qwen3-VL-30B-A3B / Mixtral shapes

accuracy: trains the digits vision-language MoE (models/vlm.py) with Qwen3-VL-30B-A3B's routing (128
experts, top-8) and with Mixtral's (8, top-2), caches them under runs/realb_vlm/, and on held-out data
reports, per simulated EP size, the rank max/mean load of vision-only, mixed and text-only prefill batches,
then caption loss and digit accuracy for BF16 (the model's own precision), ReaLB with FP8, ReaLB with
FP4 numerics, FP8 everywhere and FP4 everywhere. It writes the routing of those batches at 8k and 16k
tokens (per layer: rows and vision rows per expert) to bench/results/realb_traces.npz.
speed: for each traced batch, layer and EP rank (contiguous placement), times that rank's real rows
through the bf16 grouped GEMM path, the FP8 path (row quantization + `torch._scaled_grouped_mm`, SwiGLU
straight to fp8, the second scaled GEMM; and the same with the rows already fp8) and the weight conversion
(the cast kernel with kept scales), at the real per-layer shapes from the transformers configs; every piece is
GPU time between CUDA events (`common.time_gpu`, medians: no host launch or sync latency, which at Qwen3-VL
rank sizes is a third of a piece and hid the overlap in runs before 2026-12-07 08:40 UTC). Layer
time = slowest rank + conversion not hidden under its dispatch (the rank's received bf16 bytes over
--link-gbps; realb_slowlink_x: over --slow-link-gbps). realb_wire8_x: the tokens quantized once on each
source rank before the dispatch (that time added), the low ranks' rows sent in fp8 (D + 4 bytes: a shorter
window to hide the conversion in), and their FP8 experts on rows already fp8. Baselines in the same run: BF16 everywhere, FP8 everywhere, EPLB-style redundant experts
(one extra copy per rank of the hottest experts, from the other batches' loads, and from this batch's:
"oracle"). "bound" is ReaLB with a free conversion. The conversion converts q13 first: the first GEMM waits
for it alone, the second for q2, so q2's conversion hides under the first GEMM too; on CUDA each low rank's
time after an NVLink dispatch is measured with that real overlap (the dispatch a sleep kernel on the main
stream; realb_modelled_x composes the same from the pieces instead). gemm_bound_x: the GEMM-only bound, every
rank's two GEMMs in FP8 with inputs already fp8 and nothing converted or quantized (any set of ranks, the best
layer time); of_gemm_bound = realb_x / gemm_bound_x. The pieces are measured only for ranks some policy lowers;
a rank lowered only by FP8 everywhere, and the wire8 columns, keep the older model (the experts wait for the
whole conversion), which is pessimistic for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, print_table, time_gpu, write_results  # noqa: E402
from moestack.inference.realb import (RealbConfig, apply_realb, choose_ranks, remove_realb,  # noqa: E402
                                     set_modality, summarize)

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "bench" / "results" / "realb_traces.npz"
# trained routing config -> (experts, top_k, d_model, d_ff); the speed shapes they stand for (transformers)
MODELS = {"qwen3vl": (128, 8, 128, 48), "mixtral": (8, 2, 128, 448)}
LINK_GBPS = 282.0  # all-to-all bus bandwidth, two H200s over NVLink, 2026-11-23 (../shared/SERVING.md)


# ---- accuracy (CPU) ----------------------------------------------------------------------------------
def trained(name: str, steps: int, retrain: bool, cache: Path):
    from safetensors.torch import load_model, save_model

    from moestack.models.vlm import VisionLanguageMoE, train_vlm, vlm_config

    cfg = vlm_config(*MODELS[name])
    path = cache / f"{name}-{steps}.safetensors"
    if path.is_file() and not retrain:
        model = VisionLanguageMoE(cfg)
        load_model(model, str(path))
        info = json.loads(path.with_suffix(".json").read_text())
        return model.eval(), info
    res = train_vlm(cfg, DATA, steps=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(res.model, str(path))
    info = {"steps": steps, "seconds": round(res.seconds, 1), "final_loss": res.history[-1]["loss"]}
    path.with_suffix(".json").write_text(json.dumps(info))
    return res.model, info


def eval_batches(kind: str, n: int, batches: int) -> list[dict]:
    """Held-out prefill batches of n sequences: vision (images only), mixed (half and half), text."""
    gen = torch.Generator().manual_seed(1)
    val = DATA.split["val"]
    out = []
    for b in range(batches):
        if kind == "vision":
            ids = val[(torch.arange(n) + b * n) % len(val)]
            out.append(DATA.image_batch(ids))
        elif kind == "mixed":
            out.append(DATA.batch("val", n // 2, n - n // 2, gen))
        else:
            out.append(DATA.text_batch("val", n, gen))
    return out


def run_eval(model, batches, cfg: RealbConfig | None) -> dict:
    from moestack.models.vlm import evaluate, vision_mask

    state = None
    if cfg is not None:
        state = apply_realb(model, cfg)
    rows = []
    for b in batches:
        rows.append(evaluate(model, b, (lambda bb: set_modality(model, vision_mask(bb))) if state else None))
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if state is not None:
        out.update(summarize(state.take_decisions()))
        remove_realb(model)
    return out


def skew(model, batches, G: int) -> dict:
    """Rank max/mean load per layer (mean and max over layers and batches) and the hottest rank's vision share."""
    cfg = RealbConfig(ranks=G, load_ratio=1e9, min_tokens=0)  # decisions are recorded, nothing goes low
    state = apply_realb(model, cfg)
    from moestack.models.vlm import vision_mask

    for b in batches:
        set_modality(model, vision_mask(b))
        with torch.no_grad():
            model(b["idx"], None, b["pixels"], b["is_image"])
    ds = state.take_decisions()
    remove_realb(model)
    mm = [max(d["loads"]) / (sum(d["loads"]) / G) for d in ds]
    hot = [d["vision"][int(np.argmax(d["loads"]))] / max(d["loads"]) for d in ds]
    return {"max_mean": float(np.mean(mm)), "max_mean_worst": float(np.max(mm)), "hot_vision": float(np.mean(hot))}


def traces(model, name: str, store: dict, sizes: list[int]) -> None:
    """Per layer rows / vision rows per expert for vision, mixed and text batches of ~8k and ~16k tokens."""
    from moestack.models.vlm import vision_mask

    S = DATA.seq_len
    for kind in ("vision", "mixed", "text"):
        for tokens in sizes:
            b = eval_batches(kind, tokens // S, 1)[0]
            mask = vision_mask(b).reshape(-1)
            with torch.no_grad():
                model(b["idx"], None, b["pixels"], b["is_image"])
            counts, vision = [], []
            for layer in model.moe_layers():
                ids = layer.last_routing.expert_ids
                E = layer.num_experts
                counts.append(torch.bincount(ids.flatten(), minlength=E))
                vision.append(torch.bincount(ids[mask].flatten(), minlength=E))
            key = f"{name}/{kind}/{tokens}"
            store[key + "/counts"] = torch.stack(counts).numpy()
            store[key + "/vision"] = torch.stack(vision).numpy()
            store[key + "/tokens"] = np.array(mask.numel())


def study_accuracy(args) -> None:
    global DATA
    from moestack.models.vlm import DigitsData

    DATA = DigitsData()
    rows, store = [], {}
    for name in args.models:
        model, info = trained(name, args.train_steps, args.retrain, Path(args.cache_dir))
        print(f"{name}: trained {info}")
        n = args.eval_tokens // DATA.seq_len
        kinds = {k: eval_batches(k, n, args.eval_batches) for k in ("vision", "mixed", "text")}
        for G in args.ep:
            for kind, batches in kinds.items():
                s = skew(model, batches, G)
                rows.append({"model": name, "ep": G, "batch": kind, "variant": "skew", **s})
            base = {k: run_eval(model, b, None) for k, b in kinds.items()}
            # the rows rule is off here: the small model's ranks have few rows per expert, and what is measured
            # is the precision's effect wherever the load and modality rules lower a rank
            variants = {"bf16": None,
                        "realb-fp8": RealbConfig(ranks=G, load_ratio=args.load_ratio, min_expert_rows=0),
                        "realb-fp4": RealbConfig(ranks=G, load_ratio=args.load_ratio, precision="fp4",
                                                 min_expert_rows=0),
                        "fp8-everywhere": RealbConfig(ranks=G, everywhere=True),
                        "fp4-everywhere": RealbConfig(ranks=G, everywhere=True, precision="fp4")}
            for vname, cfg in variants.items():
                for kind, batches in kinds.items():
                    r = base[kind] if cfg is None else run_eval(model, batches, cfg)
                    row = {"model": name, "ep": G, "batch": kind, "variant": vname, **r}
                    for k in ("caption_loss", "text_loss", "accuracy"):
                        if k in r and base[kind][k]:
                            row[f"{k}_change"] = r[k] / base[kind][k] - 1
                    rows.append(row)
        traces(model, name, store, args.trace_tokens)
    print_table([r for r in rows if r["variant"] == "skew"], ["model", "ep", "batch", "max_mean", "max_mean_worst",
                                                             "hot_vision"])
    print()
    print_table([r for r in rows if r["variant"] != "skew"],
                ["model", "ep", "batch", "variant", "caption_loss", "caption_loss_change", "accuracy",
                 "text_loss", "text_loss_change", "realb_low_layers", "realb_layers"])
    Path(args.traces).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.traces, **store)
    print(f"traces -> {args.traces}")
    write_results("realb_accuracy", rows)


# ---- speed (GPU) -------------------------------------------------------------------------------------
def speed_shapes(scale: int) -> dict:
    """Per-layer expert shapes (d_model, d_ff, experts, top_k) from the transformers configs."""
    from transformers import MixtralConfig, Qwen3VLMoeConfig

    q = Qwen3VLMoeConfig(text_config={"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
                                      "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_attention_heads": 32,
                                      "num_key_value_heads": 4, "head_dim": 128}).text_config
    m = MixtralConfig()  # the defaults are Mixtral-8x7B's
    return {"qwen3vl": (q.hidden_size // scale, q.moe_intermediate_size // scale, q.num_experts, q.num_experts_per_tok),
            "mixtral": (m.hidden_size // scale, m.intermediate_size // scale, m.num_local_experts,
                        m.num_experts_per_tok)}


class RankTimer:
    """Times one EP rank's expert work at a shape: bf16 GEMMs, FP8 GEMMs, and the weight conversion."""

    def __init__(self, D: int, F: int, max_experts: int, max_rows: int, device, reps: int):
        from moestack.moe.experts import GroupedExperts

        self.device, self.reps = device, reps
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.ex = GroupedExperts(max_experts, D, F).to(device, dt)
        self.x = torch.randn(max_rows, D, device=device, dtype=dt)
        self.dt = dt
        self.cache: dict = {}  # the current rank's tensors (`_setup`)
        self.times_cache: dict = {}  # seconds per (piece, counts)
        self.cycles_per_ms = None  # torch.cuda._sleep's rate, measured on first use (`pipelined`)

    def _setup(self, counts: list[int]) -> dict:
        """The rank's rows, weights and their fp8 forms (kept per counts: the pieces below share them)."""
        from moestack.inference.lowp import fp8_scales, quantize_fp8

        key = ("setup", tuple(counts))
        if key not in self.cache:
            E, N = len(counts), sum(counts)
            x = self.x[:N]
            w13, w2 = self.ex.w13[:E].detach(), self.ex.w2[:E].detach()
            q13, s13 = quantize_fp8(w13, -2, transpose=True)
            q2, s2 = quantize_fp8(w2, -2, transpose=True)
            self.cache.clear()  # one rank's tensors at a time (a Mixtral rank's fp8 copies are GBs)
            self.cache[key] = dict(c=torch.tensor(counts, device=self.device), x=x, xq=quantize_fp8(x, -1), w13=w13,
                                   w2=w2, q13=q13, s13=s13, q2=q2, s2=s2, k13=fp8_scales(w13, -2), k2=fp8_scales(w2, -2))
        return self.cache[key]

    def _timed(self, counts: list[int], name: str, fns: dict) -> float:
        key = (name, tuple(counts))
        if key not in self.times_cache:
            self.times_cache[key] = time_gpu(fns[name], self.device, reps=self.reps) if sum(counts) else 0.0
        return self.times_cache[key]

    def pieces(self, counts: list[int], names: tuple[str, ...]) -> dict:
        """Seconds for these rows per local expert, for each of `names`:
        bf16 (the bf16 experts), fp8 / fp8_pre (the FP8 experts with the rows quantized on the rank / arriving
        in fp8), fp8_up (the FP8 path up to SwiGLU's fp8 output, rows quantized on the rank), conv / conv13
        (the weight conversion with kept scales: both projections / gate-up only), gemm16 / gemm8 (the two
        GEMMs alone, bf16 / fp8 with every input already fp8: the GEMM-only bound)."""
        from moestack.inference.lowp import cast_fp8, fp8_experts, fp8_grouped_mm, quantize_fp8, swiglu_fp8

        if sum(counts) == 0:
            return {n: 0.0 for n in names}
        z = self._setup(counts)
        c, x, (xq, xs) = z["c"], z["x"], z["xq"]
        offs = torch.cumsum(c, 0).to(torch.int32)
        if ("gemm16" in names or "gemm8" in names) and "a16" not in z:  # a stand-in SwiGLU output, and in fp8
            z["a16"] = torch.randn(x.shape[0], z["w2"].shape[1], device=self.device, dtype=self.dt)
            z["a8"] = quantize_fp8(z["a16"], -1)
        fns = {
            "bf16": lambda: self.ex.run(x, c, z["w13"], z["w2"]),
            "fp8": lambda: fp8_experts(x, c, z["q13"], z["s13"], z["q2"], z["s2"], self.dt),
            "fp8_pre": lambda: fp8_experts(xq, c, z["q13"], z["s13"], z["q2"], z["s2"], self.dt, xs),
            "fp8_up": lambda: swiglu_fp8(fp8_grouped_mm(x, z["q13"], z["s13"], c, self.dt)),
            "conv": lambda: (cast_fp8(z["w13"], z["k13"], -2, out=z["q13"], transpose=True),
                             cast_fp8(z["w2"], z["k2"], -2, out=z["q2"], transpose=True)),
            "conv13": lambda: cast_fp8(z["w13"], z["k13"], -2, out=z["q13"], transpose=True),
            "gemm16": lambda: (torch._grouped_mm(x, z["w13"], offs=offs), torch._grouped_mm(z["a16"], z["w2"], offs=offs)),
            "gemm8": lambda: (fp8_grouped_mm(xq, z["q13"], z["s13"], c, self.dt, xs),
                              fp8_grouped_mm(z["a8"][0], z["q2"], z["s2"], c, self.dt, z["a8"][1])),
        }
        return {n: self._timed(counts, n, fns) for n in names}

    def times(self, counts: list[int]) -> dict:
        """bf16, fp8, fp8_pre and conv seconds (see `pieces`)."""
        return self.pieces(counts, ("bf16", "fp8", "fp8_pre", "conv"))

    def pipelined(self, counts: list[int], window_ms: float) -> float | None:
        """Seconds after a dispatch of window_ms until a low rank's FP8 experts finish, measured with the real
        overlap on this GPU: the main stream waits out the dispatch (a sleep kernel standing in for the
        all-to-all, enqueued first) while the side stream converts q13 then q2, the first GEMM waits for q13,
        the second for q2 (as inference/realb.py runs them). None off CUDA (the layer model composes the pieces instead)."""
        from moestack.inference.lowp import cast_fp8, fp8_experts

        if self.device.type != "cuda" or sum(counts) == 0:
            return None
        if self.cycles_per_ms is None:
            n = 10_000_000
            self.cycles_per_ms = n / (time_gpu(lambda: torch.cuda._sleep(n), self.device, reps=5) * 1e3)
        key = ("pipe", tuple(counts), round(window_ms, 4))
        if key in self.times_cache:
            return self.times_cache[key]
        z = self._setup(counts)
        side = torch.cuda.Stream(self.device)
        cycles = int(window_ms * self.cycles_per_ms)

        def run():
            main = torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            e13, e2 = torch.cuda.Event(), torch.cuda.Event()
            torch.cuda._sleep(cycles)  # the dispatch, enqueued first (as inference/realb.py does)
            with torch.cuda.stream(side):
                cast_fp8(z["w13"], z["k13"], -2, out=z["q13"], transpose=True)
                e13.record()
                cast_fp8(z["w2"], z["k2"], -2, out=z["q2"], transpose=True)
                e2.record()
            main.wait_event(e13)
            fp8_experts(z["x"], z["c"], z["q13"], z["s13"], z["q2"], z["s2"], self.dt,
                        before_down=lambda: main.wait_event(e2))

        self.times_cache[key] = max(0.0, time_gpu(run, self.device, reps=self.reps) - window_ms / 1e3)
        return self.times_cache[key]

    def quantize_tokens(self, tokens: int) -> float:
        """Seconds to quantize `tokens` token rows (a source rank's share, before an fp8 dispatch)."""
        from moestack.inference.lowp import quantize_fp8

        key = ("tokens", tokens)
        if key not in self.times_cache:
            x = self.x[:tokens]
            self.times_cache[key] = time_gpu(lambda: quantize_fp8(x, -1), self.device, reps=self.reps)
        return self.times_cache[key]


def dispatch_ms(rows: float, G: int, width_bytes: int, gbps: float) -> float:
    """A rank's dispatch window: its rows from the other G - 1 ranks (evenly spread sources) over the link."""
    return rows * (G - 1) / G * width_bytes / (gbps * 1e9) * 1e3


def low_rank_ms(fp8: float, conv: float, window: float, up: float | None = None, conv13: float | None = None) -> float:
    """A low rank's time after its dispatch window: the conversion runs from the dispatch's start on a side
    stream, q13 then q2; with the pieces known (first half `up`, q13's share `conv13`) the first GEMM waits for
    q13 only and the second for q2, else the experts wait for the whole conversion."""
    if up is None or conv13 is None:
        return fp8 + max(0.0, conv - window)
    start = max(window, conv13)
    return max(start + up, conv) + (fp8 - up) - window


def eplb_loads(counts: np.ndarray, history: np.ndarray, G: int) -> list[list[float]]:
    """Rows per slot per rank with one redundant copy per rank of the hottest experts by `history` [E]: each
    copy goes to the rank with the least history load that lacks it, and an expert's rows split evenly."""
    E = counts.size
    per = E // G
    slots = [list(range(g * per, (g + 1) * per)) for g in range(G)]
    load = np.array([history[s].sum() for s in slots], dtype=float)
    replicas = {e: 1 for e in range(E)}
    for e in np.argsort(-history)[:G]:
        cand = [g for g in range(G) if e not in slots[g] and len(slots[g]) == per]
        if not cand:
            continue
        g = min(cand, key=lambda r: load[r])
        slots[g].append(int(e))
        replicas[int(e)] += 1
        load = np.array([sum(history[x] / replicas[x] for x in s) for s in slots])  # every holder's share shrinks
    return [[counts[e] / replicas[e] for e in s] for s in slots]


def study_speed(args) -> None:
    """Measure every traced rank on this device, then evaluate the policies on those times."""
    device = torch.device(args.device)
    data = np.load(args.traces)
    shapes = speed_shapes(args.scale)
    rows = []
    for name in args.models:
        D, F, E, k = shapes[name]
        keys = sorted({k_.rsplit("/", 1)[0] for k_ in data.files if k_.startswith(name + "/")})
        max_rows = max(int(data[k_ + "/counts"].sum(1).max()) for k_ in keys)
        timer = RankTimer(D, F, E // min(args.ep) + 1, max_rows, device, args.reps)
        for G in args.ep:
            for key in keys:
                counts = data[key + "/counts"]
                others = [k_ for k_ in keys if k_ != key and k_.split("/")[1] == key.split("/")[1]]
                history = sum(data[k_ + "/counts"] for k_ in others) if others else counts
                per = E // G
                for layer in range(counts.shape[0]):
                    c = counts[layer]
                    t = [timer.times(c[g * per:(g + 1) * per].tolist()) for g in range(G)]
                    row = {"model": name, "ep": G, "batch": key.split("/", 1)[1], "layer": layer,
                           "device": device_name(device), "rank_bf16_ms": [x["bf16"] * 1e3 for x in t],
                           "rank_fp8_ms": [x["fp8"] * 1e3 for x in t], "rank_conv_ms": [x["conv"] * 1e3 for x in t],
                           "rank_fp8pre_ms": [x["fp8_pre"] * 1e3 for x in t],
                           "src_quant_ms": timer.quantize_tokens(-(-int(data[key + "/tokens"]) // G)) * 1e3}
                    extras(row, timer, c, data[key + "/vision"][layer], int(data[key + "/tokens"]), G, D, args)
                    bf16 = max(row["rank_bf16_ms"])
                    for label, hist in (("eplb", history[layer]), ("eplb_oracle", c)):
                        te = [timer.times([int(round(v)) for v in sl])["bf16"] * 1e3 for sl in eplb_loads(c, hist, G)]
                        row[f"{label}_x"] = bf16 / max(te)
                    rows.append(row)
    evaluate_speed(rows, data, shapes, args)


def policies(args) -> dict[str, RealbConfig]:
    default = RealbConfig(load_ratio=args.load_ratio)
    out = {"realb": default, "realb_any_rows": RealbConfig(load_ratio=args.load_ratio, min_expert_rows=0)}
    out.update({f"realb{r}": RealbConfig(load_ratio=r) for r in args.ratios if r != args.load_ratio})
    return out


def extras(row: dict, timer: RankTimer, c: np.ndarray, v: np.ndarray, tokens: int, G: int, D: int, args) -> None:
    """What the layer model needs beyond every rank's bf16 / fp8 / conversion times, measured only where it
    counts: for each rank some policy lowers, the split pieces (fp8_up, conv13) and, on CUDA, the rank's real
    overlapped time after an NVLink dispatch (`RankTimer.pipelined`); and the GEMM-only bound's pieces
    (gemm16, gemm8) for the ranks that set the layer time as the slowest ones are lowered in turn."""
    E = c.size
    per = E // G
    counts = [c[g * per:(g + 1) * per].tolist() for g in range(G)]
    loads, vis = torch.tensor(c.reshape(G, per).sum(1)), torch.tensor(v.reshape(G, per).sum(1))
    low_any = torch.zeros(G, dtype=torch.bool)
    for cfg in policies(args).values():
        low_any |= choose_ranks(loads, vis, tokens, cfg, per)
    none = [None] * G
    row.update(rank_fp8up_ms=list(none), rank_conv13_ms=list(none), rank_pipe_ms=list(none),
               rank_gemm16_ms=list(none), rank_gemm8_ms=list(none), pipe_link_gbps=args.link_gbps)
    for g in low_any.nonzero().flatten().tolist():
        t = timer.pieces(counts[g], ("fp8_up", "conv13"))
        row["rank_fp8up_ms"][g], row["rank_conv13_ms"][g] = t["fp8_up"] * 1e3, t["conv13"] * 1e3
        pipe = timer.pipelined(counts[g], dispatch_ms(float(loads[g]), G, 2 * D, args.link_gbps))
        row["rank_pipe_ms"][g] = None if pipe is None else pipe * 1e3
    eff = list(row["rank_bf16_ms"])
    for _ in range(G):  # lower the slowest rank by its GEMM-only ratio until the slowest is one already lowered
        g = int(np.argmax(eff))
        if row["rank_gemm16_ms"][g] is not None:
            break
        t = timer.pieces(counts[g], ("gemm16", "gemm8"))
        row["rank_gemm16_ms"][g], row["rank_gemm8_ms"][g] = t["gemm16"] * 1e3, t["gemm8"] * 1e3
        eff[g] = min(eff[g], gemm_only_ms(row, g))


def gemm_only_ms(row: dict, g: int) -> float:
    """Rank g's time with only its two GEMMs in FP8 (inputs already fp8, nothing converted): the bound."""
    tb, g16, g8 = row["rank_bf16_ms"][g], row["rank_gemm16_ms"][g], row["rank_gemm8_ms"][g]
    return tb if g16 is None else min(tb, tb - g16 + g8)


def evaluate_speed(rows: list[dict], data, shapes: dict, args, source: str = "") -> None:
    """Layer times of each policy from measured per-rank times (rows) and the traces' loads and vision shares."""
    pols = policies(args)
    default = pols["realb"]
    for row in rows:
        D, _, E, _ = shapes[row["model"]]
        G = row["ep"]
        key = f"{row['model']}/{row['batch']}"
        c, v = data[key + "/counts"][row["layer"]], data[key + "/vision"][row["layer"]]
        tokens = int(data[key + "/tokens"])
        loads = torch.tensor(c.reshape(G, E // G).sum(1))
        vis = torch.tensor(v.reshape(G, E // G).sum(1))
        tb, tf, tc = row["rank_bf16_ms"], row["rank_fp8_ms"], row["rank_conv_ms"]
        tp, src = row.get("rank_fp8pre_ms"), row.get("src_quant_ms", 0.0)  # absent in runs before 2026-12-03 pm

        up, c13 = row.get("rank_fp8up_ms") or [None] * G, row.get("rank_conv13_ms") or [None] * G
        pipe = row.get("rank_pipe_ms") or [None] * G  # absent in runs before 2026-12-07

        def layer_ms(low, conv=True, gbps=args.link_gbps, wire8=False, measured=True):
            # rows in over the link, ms: a rank's own rows (1/G of them, for evenly spread sources) stay home;
            # bf16 rows (2 D bytes), or with wire8 the low ranks' rows in fp8 with their scale (D + 4 bytes), the
            # tokens quantized once on every source rank first (src ms, before the dispatch: on the critical path).
            # A low rank: its overlap measured on the GPU (NVLink window, bf16 rows), else composed from pieces.
            width = [(D + 4) if (wire8 and low[g]) else 2 * D for g in range(G)]
            dispatch = [dispatch_ms(float(loads[g]), G, width[g], gbps) for g in range(G)]
            fp8 = tp if wire8 else tf

            def low_ms(g):
                if not conv:
                    return fp8[g]
                if measured and pipe[g] is not None and gbps == row.get("pipe_link_gbps") and not wire8:
                    return pipe[g]  # measured with this link's dispatch window
                return low_rank_ms(fp8[g], tc[g], dispatch[g], None if wire8 else up[g], c13[g])

            t = max(low_ms(g) if low[g] else tb[g] for g in range(G))
            return t + (src if wire8 and any(low) else 0.0)

        bf16 = layer_ms([False] * G)
        row.update(tokens=tokens, max_mean=float(loads.max() / loads.float().mean()), bf16_ms=bf16,
                   fp8_all_x=bf16 / layer_ms([True] * G))
        if "rank_gemm16_ms" in row:  # the GEMM-only bound: any rank's two GEMMs in FP8, nothing else paid
            row["gemm_bound_x"] = bf16 / max(gemm_only_ms(row, g) for g in range(G))
        for label, cfg in pols.items():
            low = choose_ranks(loads, vis, tokens, cfg, E // G).tolist()
            row[f"{label}_x"] = bf16 / layer_ms(low)
            row[f"{label}_low"] = sum(low)
            if label == "realb":
                row["realb_modelled_x"] = bf16 / layer_ms(low, measured=False)
                row["bound_x"] = bf16 / layer_ms(low, conv=False)
                row["realb_slowlink_x"] = bf16 / layer_ms(low, gbps=args.slow_link_gbps)
                if tp is not None:  # rows quantized at the source and sent in fp8 (inference/realb.py: one process)
                    row["realb_wire8_x"] = bf16 / layer_ms(low, wire8=True)
                    row["realb_wire8_slowlink_x"] = bf16 / layer_ms(low, gbps=args.slow_link_gbps, wire8=True)
    agg = {}
    for r in rows:
        agg.setdefault((r["model"], r["ep"], r["batch"]), []).append(r)
    table = []
    for (m, G, b), rs in agg.items():
        line = {"model": m, "ep": G, "batch": b, "max_mean": float(np.mean([r["max_mean"] for r in rs])),
                "bf16_ms": float(np.sum([r["bf16_ms"] for r in rs]))}
        for col in [c for c in rs[0] if c.endswith("_x") or c.endswith("_low")]:
            vals = [r[col] for r in rs]
            line[col] = float(np.exp(np.mean(np.log(vals)))) if col.endswith("_x") else float(np.mean(vals))
        if "gemm_bound_x" in line:
            line["of_gemm_bound"] = line["realb_x"] / line["gemm_bound_x"]
        table.append(line)
    cols = ["model", "ep", "batch", "max_mean", "bf16_ms", "fp8_all_x", "eplb_x", "eplb_oracle_x", "realb_x",
            "realb_modelled_x", "realb_low", "bound_x", "gemm_bound_x", "of_gemm_bound", "realb_slowlink_x", "realb_wire8_x", "realb_wire8_slowlink_x", "realb_any_rows_x"]
    cols = [c for c in cols if c in table[0]]
    cols += [f"realb{r}_x" for r in args.ratios if r != args.load_ratio]
    print(f"device: {rows[0]['device']}{source}; per batch: layer-time speed-up over BF16 everywhere, geometric "
          f"mean over the layers; bf16_ms summed over them; realb = {default}")
    print_table(table, cols)
    write_results("realb_speed", [{"summary": True, "source": source, **t} for t in table] + rows)


def study_from(args) -> None:
    """Re-evaluate the policies on per-rank times an earlier speed run measured (--from its jsonl)."""
    rows = [json.loads(line) for line in Path(args.from_results).read_text().splitlines()]
    rows = [r for r in rows if "rank_bf16_ms" in r and not r.get("summary") and r["model"] in args.models]
    if not rows:
        raise SystemExit(f"{args.from_results}: no per-rank rows of bench/realb.py --study speed")
    evaluate_speed(rows, np.load(args.traces), speed_shapes(args.scale), args, source=f" (times from {args.from_results})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", choices=["accuracy", "speed", "from"], required=True,
                    help="from: re-evaluate the policies on the per-rank times in --from-results")
    ap.add_argument("--from-results", default="", help="a realb_speed.jsonl written by --study speed")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ep", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--traces", default=str(TRACES))
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--eval-batches", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens per evaluation batch")
    ap.add_argument("--trace-tokens", nargs="+", type=int, default=[8192, 16384], help="traced batch sizes")
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "realb_vlm"), help="where trained VLMs are kept")
    ap.add_argument("--load-ratio", type=float, default=RealbConfig.load_ratio)
    ap.add_argument("--ratios", nargs="+", type=float, default=[1.0, 1.15, 1.3, 1.5], help="load_ratio sweep")
    ap.add_argument("--link-gbps", type=float, default=LINK_GBPS)
    ap.add_argument("--slow-link-gbps", type=float, default=24.0, help="inter-node-like link (NCCL_P2P_DISABLE=1 on "
                    "two H200s, 2026-11-23): realb_slowlink_x hides the conversion under that dispatch")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--scale", type=int, default=1, help="divide the speed shapes' dims (CPU smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    {"accuracy": study_accuracy, "speed": study_speed, "from": study_from}[args.study](args)


if __name__ == "__main__":
    main()
