"""The serving engine against Hugging Face `generate` on the same model, in the same run.

    python bench/serve.py                                  # OLMoE, Qwen3-30B-A3B, Mixtral shapes, 4 layers, GPU
    python bench/serve.py --models olmoe --layers 16       # every layer of OLMoE-1B-7B
    python bench/serve.py --quick                          # tiny shapes: a CPU smoke run
    python bench/serve.py --drop-rates 0.25                # + DualSparse at 25% drop against no dropping
                                                           #   (policies auto and token, timed runs taking turns)

Models are built from their real configs (per-layer shapes, GQA, q/k norms, experts) with random weights and
`--layers` decoder layers. For each model and batch size B: B prompts of --prompt-len random tokens,
--new-tokens greedy tokens each (eos ignored), all submitted at once.
- engine: prefill tok/s (prompt tokens / time of the steps that prefill), decode tok/s (tokens / time of
  the all-decode steps), time to first token and inter-token latency p50/p99 per request;
- HF: `generate` with grouped_mm experts and SDPA attention on the same weights: prefill tok/s from a
  1-token generate, decode tok/s from (N-token generate - 1-token generate);
- roofline: the HBM bound of a decode step, bytes / the GPU's peak HBM rate (4.8 TB/s on an H200, 3.35 on an
  H100 SXM; the row's `hbm_tbps`), where bytes = the dense weights (attention,
  norms, routers, shared experts, LM head), the weights of the experts the step's tokens were routed to
  (distinct experts per layer, read from the engine's expert loads of every decode step) and the KV
  cache attended (context tokens x layers x 2 x kv heads x head size); `roofline%` = measured decode tok/s
  over the bound's tok/s.
A mixed workload (--mixed N requests, prompt and output lengths uniform in ranges, --mixed-batch running at
once) gives offline throughput against HF generate over the same requests in left-padded batches.
JSON lines in $OUT/serve.jsonl (device runs) or bench/results/serve.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, sync, write_results  # noqa: E402

from moestack.inference.dropping import DualSparseDispatcher  # noqa: E402
from moestack.inference.dualsparse import drop_stats, reset_drop_stats  # noqa: E402
from moestack.serve import LLM, SamplingParams  # noqa: E402
from moestack.serve import loader  # noqa: E402

HBM_TBPS = {"H200": 4.8, "H100 80GB HBM3": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0}  # peak HBM rate by device name


def hbm_tbps(name: str) -> float:
    """The peak HBM rate (TB/s) of the GPU called `name` (4.8, an H200's, where the name is not known)."""
    rate = next((v for k, v in HBM_TBPS.items() if k in name), None)
    if rate is None:
        print(f"bench/serve.py: no HBM rate known for {name!r}; the roofline assumes 4.8 TB/s (an H200's)")
    return rate or 4.8

CONFIGS = {  # the published configs' per-layer shapes (num_hidden_layers set by --layers)
    "olmoe": ("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                                  rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                         moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                         rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6)),
    "mixtral": ("MixtralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                      num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768,
                                      rms_norm_eps=1e-5)),
    "tiny": ("Qwen3MoeConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                                    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024)),
}


def hf_model(name: str, layers: int, device: str, dtype: torch.dtype):
    import transformers

    cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cls)(**kw, num_hidden_layers=layers)
    if device == "cuda":
        cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():  # routers of random Qwen/OLMoE models start at zero: give them real routing
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 0.02)
    return model


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- the engine -----------------------------------------------------------------------------------------
def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: list[int], count_active: bool = False) -> dict:
    """Submit every prompt at once, step to the end; per-step and per-request times. count_active: also count
    each decode step's routed experts (device work between the steps: for an untimed run)."""
    t0 = time.perf_counter()
    rids = [llm.add_request(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
            for p, m in zip(prompts, max_tokens)]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = 0
    active: list[int] = []
    ctx_tokens: list[int] = []
    while llm.has_unfinished():
        running = list(llm.scheduler.running)
        computed0 = llm.stats.prompt_tokens
        decode0 = llm.stats.decode_steps
        ctx = sum(len(s) for s in running)
        s0 = time.perf_counter()
        outs = llm.step()
        now = time.perf_counter()
        if llm.stats.decode_steps > decode0:
            decode_s += now - s0
            decode_tokens += len(outs)
            loads = llm.runner.last_loads if count_active else None  # the latest queued step's, on the device
            if loads is not None and loads.numel():
                active.append((loads > 0).sum())
            ctx_tokens.append(ctx)
        else:
            prefill_s += now - s0
            prefill_tokens += llm.stats.prompt_tokens - computed0
        for o in outs:
            if o.new_token_ids:
                if o.request_id not in first:
                    first[o.request_id] = now - t0
                else:
                    itl.append(now - last[o.request_id])
                last[o.request_id] = now
    total = time.perf_counter() - t0
    llm.check_blocks()
    ttft = [first[r] for r in rids]
    after_first = sum(max_tokens) - len(prompts)
    return dict(total_s=total, prefill_tok_s=prefill_tokens / prefill_s if prefill_s else None,
                decode_tok_s=decode_tokens / decode_s if decode_s else None,
                out_tok_s=sum(max_tokens) / total,
                steady_tok_s=after_first / (total - max(ttft)) if total > max(ttft) else None,  # cross-check of decode_tok_s
                ttft_p50_ms=1e3 * pct(ttft, 0.5),
                itl_p50_ms=1e3 * pct(itl, 0.5) if itl else None, itl_p99_ms=1e3 * pct(itl, 0.99) if itl else None,
                active_experts=torch.stack(active).float().mean().item() if active else None,
                ctx_tokens=statistics.mean(ctx_tokens) if ctx_tokens else None)


def roofline_tok_s(model, batch: int, active_experts: float, ctx_tokens: float, tbps: float = 4.8) -> float:
    """Decode tok/s at the HBM bound for a step of `batch` tokens (see the module docstring)."""
    experts = [m for m in model.moe_layers()]
    expert_params = {id(p) for layer in experts for p in layer.experts.parameters()}
    elt = model.embed.weight.element_size()
    dense = sum(p.numel() for p in model.parameters() if id(p) not in expert_params and p is not model.embed.weight)
    if model.spec.tie_embeddings:
        dense += model.embed.weight.numel()  # the LM head reads the (tied) table
    per_expert = sum(sum(p.numel() for p in layer.experts.parameters()) / layer.num_experts for layer in experts) / max(len(experts), 1)
    s = model.spec
    kv = ctx_tokens * s.n_layers * 2 * s.n_kv_heads * s.head_dim
    bytes_ = elt * (dense + active_experts * per_expert + kv) + batch * s.d_model * elt
    return batch / (bytes_ / (tbps * 1e12))


# -- Hugging Face generate ------------------------------------------------------------------------------
@torch.inference_mode()
def hf_generate(hf, x: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    return hf.generate(x, attention_mask=mask if mask is not None else torch.ones_like(x), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)


def time_hf(hf, x: torch.Tensor, n: int, device: str, reps: int = 3) -> float:
    """Median seconds of an n-token HF generate, after a warm-up call."""
    hf_generate(hf, x, n)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        hf_generate(hf, x, n)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_fixed(hf, prompts: list[list[int]], n: int, device: str) -> dict:
    x = torch.tensor(prompts, device=device)
    t1 = time_hf(hf, x, 1, device)
    tn = time_hf(hf, x, n, device)
    B, P = x.shape
    return dict(hf_prefill_tok_s=B * P / t1, hf_decode_tok_s=B * (n - 1) / max(tn - t1, 1e-9), hf_total_s=tn)


def hf_mixed(hf, prompts: list[list[int]], max_tokens: list[int], batch: int, device: str) -> float:
    """Seconds for HF generate over the requests in left-padded batches of `batch`, each batch run to its longest."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, ms = prompts[i:i + batch], max_tokens[i:i + batch]
        L = max(map(len, ps))
        x = torch.tensor([[0] * (L - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=device)
        hf_generate(hf, x, max(ms), mask)
    sync(device)
    return time.perf_counter() - t0


def profile(llm: LLM, prompts, max_tokens, path: Path) -> None:
    """torch.profiler over the workload (after a warm run): the kernel table, by device time, in `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    for suffix, outs in (("prefill", [1] * len(prompts)), ("all", max_tokens)):
        run_engine(llm, prompts, outs)
        llm.blocks.reset_prefix_cache()
        with prof(activities=acts) as p:
            run_engine(llm, prompts, outs)
        llm.blocks.reset_prefix_cache()
        out = path.with_name(f"{path.stem}_{suffix}.txt")
        out.write_text(p.key_averages().table(sort_by=key, row_limit=45))
        print(f"profile: {out}")
    if torch.cuda.is_available() and llm.runner.graphs:
        step_timeline(llm, len(prompts), path.with_name(f"{path.stem}_step.txt"))


def step_timeline(llm: LLM, batch: int, path: Path, reps: int = 3) -> None:
    """The kernels of one decode-graph replay in launch order: start, duration and the idle gap before each
    (replays `reps` times, 2 ms apart, and keeps the middle one)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    graph = llm.runner.graphs[llm.runner._graph_for(batch)][0]
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            graph.replay()
            torch.cuda.synchronize()
            time.sleep(0.002)
    kernels = sorted((e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    steps, cur = [], []
    for e in kernels:  # a replay ends where the next kernel starts over a millisecond later
        if cur and e.time_range.start - cur[-1].time_range.end > 1000:
            steps.append(cur)
            cur = []
        cur.append(e)
    steps.append(cur)
    step = steps[len(steps) // 2]
    t0, end, busy = step[0].time_range.start, step[0].time_range.start, 0.0
    lines = [f"{'start_us':>9} {'dur_us':>8} {'gap_us':>7}  kernel"]
    for e in step:
        gap = max(e.time_range.start - end, 0.0)
        lines.append(f"{e.time_range.start - t0:9.1f} {e.time_range.elapsed_us():8.2f} {gap:7.2f}  {e.name[:110]}")
        end, busy = max(end, e.time_range.end), busy + e.time_range.elapsed_us()
    lines.append(f"# {len(step)} kernels, span {end - t0:.1f} us, busy {busy:.1f} us, idle {end - t0 - busy:.1f} us")
    path.write_text("\n".join(lines) + "\n")
    print(f"profile: {path} ({lines[-1][2:]})")


def profile_hf(hf, prompts, path: Path) -> None:
    """torch.profiler over HF's prefill (a 1-token generate, after a warm one): its kernel table in `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    x = torch.tensor(prompts, device=hf.device)
    hf_generate(hf, x, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        hf_generate(hf, x, 1)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.write_text(p.key_averages().table(sort_by=key, row_limit=45))
    print(f"profile: {path}")


def free(llm: LLM) -> None:
    """Give the engine's KV cache and graphs back before the next engine is built."""
    llm.runner.graphs.clear()
    llm.runner.prefill_graphs.clear()
    llm.runner.kv.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- driver ---------------------------------------------------------------------------------------------
def engine_for(hf, args, device, dtype, batch: int, drop_rate=None, drop_policy: str | None = None) -> LLM:
    model = loader.build_hf(hf.config, hf.state_dict(), device, dtype, max_len=args.max_model_len)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(7)

    def calib(batches, seq):
        return [torch.randint(0, vocab, (4, seq), generator=gen).to(device) for _ in range(batches)]

    served = loader.Served(model, loader.Tokenizer(), f"{hf.config.model_type} (random weights)",
                           hf.config.model_type, calib)
    blocks = args.num_blocks or batch * -(-(2 * args.prompt_len + 2 * args.new_tokens) // 16) + 64
    return LLM(served, max_num_seqs=batch, max_num_batched_tokens=args.max_batched_tokens,
               cuda_graphs=not args.no_graphs, drop_rate=drop_rate, drop_policy=drop_policy, num_blocks=blocks,
               fused_rows=args.fused_rows,
               prefill_graph_tokens=args.prefill_graph_tokens)


def timed_engine(llm: LLM, prompts, max_tokens, reps: int = 3) -> dict:
    """run_engine on the workload once to warm up (kernels compile, caches fill), then `reps` timed runs: the
    median of each figure (HF's are medians of 3 too; a batch-64 prefill is one step, one sample per run)."""
    return timed_engines([llm], prompts, max_tokens, reps)[0]


def timed_engines(llms: list[LLM], prompts, max_tokens, reps: int = 3) -> list[dict]:
    """timed_engine for engines compared with each other: each warms up, then their timed runs take turns
    (1, 2, .., 1, 2, ..), so a drift of the clocks or the host meets them alike. A DualSparse engine's row
    also has the share of sub-expert computations its timed runs skipped. Every engine stays in memory
    throughout (weights and KV cache of each): at --layers 16 compare fewer at once."""
    warm = [run_engine(llm, prompts, max_tokens, count_active=True) for llm in llms]  # greedy: timed runs route alike
    runs: list[list[dict]] = [[] for _ in llms]
    for llm in llms:
        if _sparse(llm):
            reset_drop_stats(llm.model)
    for _ in range(reps):
        for llm, got in zip(llms, runs):
            llm.blocks.reset_prefix_cache()  # every timed run computes every prompt again
            got.append(run_engine(llm, prompts, max_tokens))
    out = []
    for llm, got, w in zip(llms, runs, warm):
        row = {k: (statistics.median(v) if (v := [r[k] for r in got if r[k] is not None]) else None) for k in got[0]}
        row["active_experts"] = w["active_experts"]
        if _sparse(llm):
            row["achieved_drop"] = drop_stats(llm.model)["drop_rate"]
        out.append(row)
    return out


def _sparse(llm: LLM) -> bool:
    return any(isinstance(layer.dispatcher, DualSparseDispatcher) for layer in llm.model.moe_layers())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="olmoe,qwen3_moe,mixtral")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--drop-rates", default="", help="DualSparse drop rates to run beside no dropping, e.g. 0.25")
    ap.add_argument("--drop-batches", default="8,64", help="batch sizes of the DualSparse rows")
    ap.add_argument("--drop-policies", default="auto,token",
                    help="the engine's drop policies to run at each drop rate (auto: whole sub-experts in decode steps)")
    ap.add_argument("--drop-reps", type=int, default=5, help="timed runs per DualSparse engine, taking turns")
    ap.add_argument("--mixed", type=int, default=128, help="requests of the mixed workload (0: skip)")
    ap.add_argument("--mixed-batch", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: what the workload needs)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192, help="the engine's token budget per step")
    ap.add_argument("--fused-rows", type=int, default=1024, help="token-choices up to which the fused MoE kernels run")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--prefill-graph-tokens", type=int, default=None,
                    help="steps that are not all decodes replay CUDA graphs up to this many tokens (default: all; 0: eager)")
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler kernel table per model and batch")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    ap.add_argument("--quick", action="store_true", help="tiny model, small batches: a CPU smoke run")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.models, args.batches, args.prompt_len, args.new_tokens = "tiny", "1,4", 16, 8
        args.mixed, args.mixed_batch, args.drop_batches = 8, 4, "4"
    batches = [int(b) for b in args.batches.split(",") if b]  # "": only the DualSparse rows
    rates = [float(r) for r in args.drop_rates.split(",") if r]
    policies = args.drop_policies.split(",")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.models.split(","):
        hf = hf_model(name, args.layers, device, dtype)
        vocab = hf.config.vocab_size
        for B in batches:
            prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=gen).tolist()
            t0 = time.perf_counter()
            llm = engine_for(hf, args, device, dtype, B)
            startup = time.perf_counter() - t0  # weights mapped in, KV cache, compiles, graph captures
            eng = timed_engine(llm, prompts, [args.new_tokens] * B)
            row = dict(bench="fixed", model=name, layers=args.layers, batch=B, prompt=args.prompt_len,
                       new=args.new_tokens, device=device_name(device), drop_rate=None, startup_s=startup, **eng)
            if args.profile:
                out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
                profile(llm, prompts, [args.new_tokens] * B, out / f"serve_profile_{name}_b{B}.txt")
                if not args.no_hf:
                    profile_hf(hf, prompts, out / f"serve_profile_hf_{name}_b{B}_prefill.txt")
            tbps = hbm_tbps(row["device"])
            roof = roofline_tok_s(llm.model, B, eng["active_experts"] or 0, eng["ctx_tokens"] or 0, tbps)
            row["roofline_tok_s"], row["hbm_tbps"] = roof, tbps
            row["roofline_pct"] = 100 * eng["decode_tok_s"] / roof if eng["decode_tok_s"] else None
            free(llm)
            del llm  # its weights too: three Mixtral engines at once only fit an 80 GB card when nothing else is held
            if not args.no_hf:
                row.update(hf_fixed(hf, prompts, args.new_tokens, device))
                row["decode_x_hf"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
                row["prefill_x_hf"] = row["prefill_tok_s"] / row["hf_prefill_tok_s"]
            rows.append(row)
            print_table([row], ["model", "batch", "prefill_tok_s", "decode_tok_s", "hf_prefill_tok_s", "hf_decode_tok_s",
                                "decode_x_hf", "prefill_x_hf", "roofline_pct", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms",
                                "startup_s"])
        for B in [int(b) for b in args.drop_batches.split(",")] if rates else []:
            prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=gen).tolist()
            variants = [(None, "-")] + [(rate, policy) for rate in rates for policy in policies]
            llms = [engine_for(hf, args, device, dtype, B, rate, None if policy == "-" else policy)
                    for rate, policy in variants]
            got = timed_engines(llms, prompts, [args.new_tokens] * B, reps=args.drop_reps)
            for (rate, policy), eng in zip(variants, got):
                rows.append(dict(bench="dualsparse", model=name, layers=args.layers, batch=B, prompt=args.prompt_len,
                                 new=args.new_tokens, device=device_name(device), drop_rate=rate, drop_policy=policy,
                                 **eng))
            for llm in llms:
                free(llm)
            del llm, llms
            base = rows[-len(variants)]
            for r in rows[1 - len(variants):]:
                r["total_x_nodrop"] = base["total_s"] / r["total_s"]
                r["decode_x_nodrop"] = r["decode_tok_s"] / base["decode_tok_s"]
            print_table(rows[-len(variants):], ["model", "batch", "drop_rate", "drop_policy", "achieved_drop", "total_s",
                                                "decode_tok_s", "prefill_tok_s", "total_x_nodrop", "decode_x_nodrop"])
        if args.mixed:
            lo, hi = max(4, args.prompt_len // 4), args.prompt_len * 2
            plens = torch.randint(lo, hi + 1, (args.mixed,), generator=gen).tolist()
            outs = torch.randint(max(2, args.new_tokens // 4), args.new_tokens * 2 + 1, (args.mixed,), generator=gen).tolist()
            prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in plens]
            llm = engine_for(hf, args, device, dtype, args.mixed_batch)
            eng = timed_engine(llm, prompts, outs)
            free(llm)
            del llm
            row = dict(bench="mixed", model=name, layers=args.layers, batch=args.mixed_batch, requests=args.mixed,
                       prompt=f"{lo}-{hi}", new=f"{max(2, args.new_tokens // 4)}-{args.new_tokens * 2}",
                       device=device_name(device), out_tokens=sum(outs), **eng)
            if not args.no_hf:
                hf_mixed(hf, prompts[: args.mixed_batch], outs[: args.mixed_batch], args.mixed_batch, device)  # warm-up
                t = hf_mixed(hf, prompts, outs, args.mixed_batch, device)
                row.update(hf_total_s=t, hf_out_tok_s=sum(outs) / t, throughput_x_hf=eng["out_tok_s"] * t / sum(outs))
            rows.append(row)
            print_table([row], ["model", "requests", "batch", "total_s", "out_tok_s", "hf_out_tok_s", "throughput_x_hf",
                                "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms"])
        del hf
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    path = write_results("serve", rows)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
