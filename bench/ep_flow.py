"""Bytes a real expert-parallel serving run sends, from the engine's own counters: home vs follow flow,
contiguous vs MoETuner ILP placement, on gloo ranks (CPU), then the all-to-all time those bytes would take
on 8 / 16-GPU links.

    make train ARGS="--run-dir /tmp/ef-run"                      # the default run (4 MoE layers x 8 experts, top-2)
    python bench/ep_flow.py --run-dir /tmp/ef-run [--gpus 2,4,8] [--prompts 16] [--max-tokens 16]
    python bench/ep_flow.py --hf-tiny                            # a random-weight HF model: no inter-layer affinity

For each rank count G the run is traced on held-out text (`moestack trace`), placed contiguously and by the
ILP (`moestack plan --method ilp`, balance first, then fewest cross-GPU transitions), and served by G gloo
processes through `LLM(..., parallel=ctx, placement=..., ep_flow=...)` on prompts from the run's validation
text (greedy, the same tokens in every configuration: checked). `LLM.traffic()` gives the bytes each rank
sent to each rank; the table shows the cross-rank part (off the diagonal) per token and MoE layer, in rows
(one row = one token's hidden state), so it carries to any model size:
- "moe": token rows of the MoE exchanges (home: out to the experts and back; follow: out, then on to the
  first choice's rank); "kv": follow's replicated keys and values, in row equivalents at the run's shape
  (2 x kv width / d_model rows per token, layer and other rank); "sample": follow's sampled rows.
- modelled exchange ms per 1k tokens (the whole forward, every layer) at Mixtral-8x7B's row (4096 x bf16; KV
  2 x 8 x 128 x bf16): per MoE layer (out and back merged into one matrix: a lower bound on two exchanges)
  and per block's KV exchange, the busiest rank's max(bytes sent, received) off the diagonal / link
  bandwidth, summed, over the whole run (not per step); the sampled rows are left out. Links: the brief's
  figures (NVLink ~280 GB/s all-to-all bus bandwidth, 24 GB/s inter-node-like, 3 GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402

LINKS = {"nvlink_280": 280e9, "internode_24": 24e9, "slow_3": 3e9}
MIXTRAL_ROW, MIXTRAL_KV = 4096 * 2, 2 * 8 * 128 * 2  # bytes of a hidden row, of one token's K and V per layer


def prompts_from(run_dir: str, n: int, length: int) -> list[list[int]]:
    from moestack.config import load_config
    from moestack.data import Corpus

    cfg = load_config(Path(run_dir) / "config.toml")
    corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
    x, _ = corpus.batch("val", 20_000, n, cfg.train.seed)
    return [row[: length + (i * 7) % length].tolist() for i, row in enumerate(x)]  # mixed lengths


def _worker(rank, world, port, path, prompts, max_tokens, configs, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moestack.config import ParallelConfig
    from moestack.parallel.mesh import init_parallel, shutdown
    from moestack.serve import LLM, SamplingParams

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for name, placement, flow in configs:
        llm = LLM(path, device="cpu", block_size=16, parallel=ctx, placement=placement, ep_flow=flow)
        counted = []
        hidden = llm.model.hidden

        def counting(tokens, *a, **kw):
            counted.append(tokens.numel())
            return hidden(tokens, *a, **kw)

        llm.model.hidden = counting
        outs = llm.generate(prompts, params, use_tqdm=False)
        sent = llm.traffic()
        toks = torch.tensor([sum(counted)])
        if flow == "home":  # each rank forwards its own requests (and idle steps)
            dist.all_reduce(toks, group=ctx.ep_group)
        spec = llm.model.spec
        rows.append({"placement": name, "flow": flow, "tokens": int(toks), "outputs": [o.token_ids for o in outs],
                     "d_model": spec.d_model, "kv_width": 2 * spec.n_kv_heads * spec.head_dim,
                     **{k: v.tolist() for k, v in sent.items()}})
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.barrier()
    shutdown(ctx)


def measure(path: str, world: int, prompts, max_tokens: int, configs) -> list[dict]:
    import torch.multiprocessing as mp

    from tests.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        mp.spawn(_worker, args=(world, free_port(), path, prompts, max_tokens, configs, str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


def summarize(row: dict, world: int) -> dict:
    moe = torch.tensor(row["moe"])  # [L, G, G]
    kv = torch.tensor(row["kv"])  # [blocks, G, G]
    sample = torch.tensor(row["sample"])
    L, T, D = moe.shape[0], row["tokens"], row["d_model"]
    off = ~torch.eye(world, dtype=torch.bool)
    meta = 12 if row["flow"] == "follow" else 0
    moe_rows = (moe * off).sum((1, 2)).double() / (D * 4 + meta)  # [L] cross-rank rows (fp32 run)
    kv_rows = (kv * off).sum((1, 2)).double() / (row["kv_width"] * 4 + 4)  # [blocks] cross-rank token K+V
    sample_rows = float((sample * off).sum()) / (D * 4 + 4)
    # Mixtral-sized bytes per rank pair: rows x row size; the all-to-all takes the busiest rank's time
    mix_moe = (moe * off).double() / (D * 4 + meta) * (MIXTRAL_ROW + meta)  # [L, G, G]
    mix_kv = (kv * off).double() / (row["kv_width"] * 4 + 4) * (MIXTRAL_KV + 4)  # [blocks, G, G]
    busiest = sum(float(torch.maximum(m.sum(2), m.sum(1)).max(1).values.sum()) for m in (mix_moe, mix_kv))
    out = {"gpus": world, "placement": row["placement"], "flow": row["flow"], "tokens": T,
           "moe_rows_per_token_layer": float(moe_rows.mean() / T), "kv_rows_per_token_layer": float(kv_rows.mean() / T),
           "kv_row_equiv": float(kv_rows.mean() / T) * row["kv_width"] / D, "sample_rows_per_token": sample_rows / T}
    for name, bw in LINKS.items():
        out[f"ms_per_1k_tok_{name}"] = busiest / bw * 1e3 / T * 1000  # the whole forward, every layer
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a trained moestack run (make train)")
    src.add_argument("--hf-tiny", action="store_true", help="a random-weight tiny qwen3_moe HF folder (no affinity)")
    ap.add_argument("--gpus", default="2,4,8")
    ap.add_argument("--experts", type=int, default=8, help="--hf-tiny: experts per layer")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--trace-tokens", type=int, default=32768)
    ap.add_argument("--time-limit", type=float, default=20.0)
    args = ap.parse_args()
    from moestack.placement import Placement, solve
    from moestack.placement.trace import RoutingTrace

    tmp = Path(tempfile.mkdtemp(prefix="ep_flow_"))
    if args.hf_tiny:
        from moestack.placement import TraceRecorder
        from moestack.serve.loader import load
        from tests.serve.helpers import hf_folder

        path = str(tmp / "hf")
        hf_folder(Path(path), "qwen3_moe", num_hidden_layers=4, max_position_embeddings=256, num_experts=args.experts)
        served = load(path)
        layers = served.model.moe_layers()
        rec = TraceRecorder(len(layers), layers[0].num_experts, layers[0].router.top_k)
        calib = served.calib_tokens(18, 64)  # calibration text (the embedded corpus) in the folder's tokenizer
        with torch.no_grad():
            for batch in calib[:16]:
                served.model(batch)
                for i, layer in enumerate(layers):
                    rec.record(i, layer.last_routing.expert_ids)
        held_out = torch.cat(calib[16:]).flatten().tolist()  # [512] tokens the trace never saw
        prompts = [held_out[i * 13: i * 13 + args.prompt_len + (i * 7) % args.prompt_len] for i in range(args.prompts)]
        trace = rec.trace()
        source = f"tiny qwen3_moe, random weights, 4 layers x {args.experts} experts top-2, calibration text"
    else:
        from moestack.runs import record_trace

        path = args.run_dir
        prompts = prompts_from(path, args.prompts, args.prompt_len)
        trace = record_trace(path, args.trace_tokens, str(tmp / "trace.npz"), "cpu")
        trace, source = RoutingTrace.load(tmp / "trace.npz"), f"run {path}"
    results = []
    for world in [int(g) for g in args.gpus.split(",")]:
        ilp, report = solve(trace, world, method="ilp", time_limit=args.time_limit)
        files = {}
        for name, plan in (("contiguous", Placement.contiguous(trace.num_layers, trace.num_experts, world)), ("ilp", ilp)):
            files[name] = str(tmp / f"{name}{world}.json")
            plan.save(files[name])
        configs = [(name, files[name], flow) for name in files for flow in ("home", "follow")]
        rows = measure(path, world, prompts, args.max_tokens, configs)
        outs = {json.dumps(r["outputs"]) for r in rows}
        assert len(outs) == 1, "greedy outputs differ between flows or placements"
        results += [{**summarize(r, world), "source": source, "ilp_status": report.status} for r in rows]
    cols = ["gpus", "placement", "flow", "tokens", "moe_rows_per_token_layer", "kv_row_equiv", "sample_rows_per_token",
            *[f"ms_per_1k_tok_{n}" for n in LINKS]]
    print(f"source: {source}; prompts {args.prompts} x {args.prompt_len}-{2 * args.prompt_len - 1} tokens, "
          f"{args.max_tokens} new tokens each (greedy, identical in every row)")
    print_table(results, cols)
    write_results("ep_flow", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
