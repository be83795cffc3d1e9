"""DualSparse-MoE: quality vs drop rate, MoE-layer speed vs drop rate, load-aware vs uniform dropping.

    python bench/dualsparse.py --run-dir RUN                 # all three studies (quality needs a trained run)
    python bench/dualsparse.py --study speed,load            # no run needed
    python bench/dualsparse.py --run-dir RUN --study quality --rates 0,0.1,0.25,0.4,0.5

(i) quality: validation loss of RUN's model vs drop rate for naive dropping of whole low-weight
(token, expert) choices, partition without reconstruction, DualSparse, and DualSparse with load-aware
dropping over --ranks simulated EP ranks; one PNG plot. (ii) speed: MoE-layer forward time (inference,
bf16 on GPU, fp32 on CPU) at each drop rate against the same layer without partition; on CUDA also both
layers through the fused MoE GEMM's prefill-sized mode (`fused_*`: fused_ratio against the fused layer without
partition, fused_vs_grouped against the grouped-GEMM one). (iii) load: with
skewed routing over --ranks simulated EP ranks (contiguous placement), each rank's kept rows and its expert
compute time alone; the slowest rank sets the MoE-module time. (iv) ep: the same three policies under real
expert parallelism, timed end to end (all-to-all included) on every rank:
    torchrun --nproc_per_node 2 bench/dualsparse.py --study ep Results: a table, JSON lines and the plot
in $OUT (device runs) or bench/results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, sync, write_results  # noqa: E402

from moestack.inference.cli import transform  # noqa: E402
from moestack.inference.dropping import work_per_expert  # noqa: E402
from moestack.inference.dualsparse import (  # noqa: E402
    drop_stats,
    moe_layers,
    reset_drop_stats,
    set_drop_rate,
    sparsify,
)
from moestack.inference.partition import PartExperts  # noqa: E402
from moestack.moe.experts import GroupedExperts, fused_inference  # noqa: E402
from moestack.moe.layer import MoELayer  # noqa: E402

SHAPES = {  # name: (d_model, d_ff, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3_moe": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "cpu": (256, 1024, 8, 2),
}
METHODS = ("naive", "partition", "dualsparse", "dualsparse+load-aware", "dualsparse+whole")


# ---- (i) quality ----------------------------------------------------------------------------------
def quality(run_dir: str, rates: list[float], args, device: str) -> list[dict]:
    """Val loss at each drop rate for every method; each method calibrated once, then re-thresholded.
    dualsparse+whole evaluates what decode batches of --eval-batch sequences drop: a [B, S] validation batch
    is S steps of B tokens (one position of every sequence), each dropping whole sub-experts. `weights_read`:
    of the sub-expert weights such a step routes to, the share it still reads (what sets a memory-bound decode
    step's time), for every method."""
    from moestack.runs import evaluate, load_model

    rows = []
    for method in METHODS:
        model, cfg, ctx = load_model(run_dir, device)
        if args.eval_batch:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=args.eval_batch))
        load_aware, whole = method.endswith("load-aware"), method.endswith("whole")
        transform(model, cfg, ctx.device, method.split("+")[0], 0.0, args.parts, args.calib_batches)
        ranks = contiguous_ranks(cfg.moe.num_experts, args.ranks)
        read = [0, 0]  # sub-expert weights read, routed: summed over steps and layers
        for layer in moe_layers(model):
            layer.dispatcher.steps = cfg.model.seq_len if whole else 1
            layer.dispatcher.layout = "packed"  # every method's drops through `keep` (counted), on CUDA too
            count_reads(layer.dispatcher, cfg.model.seq_len, read)
        for rate in rates:
            set_drop_rate(model, rate, load_aware=load_aware, expert_rank=[ranks] * len(moe_layers(model)),
                          whole_rows=cfg.train.batch_size * cfg.moe.top_k if whole else 0)
            reset_drop_stats(model)
            read[:] = [0, 0]
            res = evaluate(model, cfg, ctx, args.batches)
            if rate > 0 and not read[1]:
                raise SystemExit(f"{method} at {rate}: no drops went through keep(); weights_read would be wrong")
            rows.append({"study": "quality", "run_dir": run_dir, "method": method, "eval_batch": cfg.train.batch_size,
                         "target": rate, "drop_rate": drop_stats(model)["drop_rate"],
                         # rate 0 never asks keep (the plain dispatch): every routed weight is read
                         "weights_read": read[0] / read[1] if read[1] else 1.0, "val_loss": res["val_loss"],
                         "perplexity": res["perplexity"], "device": device_name(ctx.device)})
            print(rows[-1], flush=True)
    base = next(r["val_loss"] for r in rows if r["target"] == 0) if 0 in rates else None
    for r in rows:
        r["increase_pct"] = 100 * (r["val_loss"] / base - 1) if base else None
    return rows


def count_reads(disp, steps: int, read: list[int]) -> None:
    """Wrap disp.keep to add, per step (token t in step t % steps), the (step, sub-expert) pairs with a kept
    computation to read[0] and those routed to read[1]."""
    keep_of = disp.keep

    def keep(routing):
        kept = keep_of(routing)
        ids = routing.expert_ids  # [T, k]
        P = disp.parts
        step = torch.arange(ids.shape[0], device=ids.device) % steps
        key = (step[:, None, None] * disp.num_experts + ids.unsqueeze(-1)) * P + torch.arange(P, device=ids.device)
        read[1] += key.unique().numel()
        read[0] += (key.flatten() if kept is None else key.flatten()[kept]).unique().numel()
        return kept

    disp.keep = keep


def contiguous_ranks(num_experts: int, ranks: int) -> list[int]:
    """EP rank of each expert under the contiguous placement."""
    if num_experts % ranks:
        raise SystemExit(f"--ranks {ranks} must divide the {num_experts} experts")
    return [e * ranks // num_experts for e in range(num_experts)]


def plot_quality(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [(r["drop_rate"] * 100, r["val_loss"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("expert computation dropped (%)")
    ax.set_ylabel("validation loss")
    ax.set_title("DualSparse-MoE: quality vs drop rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- (ii) speed -----------------------------------------------------------------------------------
def make_layer(d, f, E, k, device, dtype, skew: float = 0.0) -> tuple[MoELayer, torch.Tensor]:
    """An inference MoE layer and the direction `m` its tokens lean towards (skew > 0: rank-0 experts attract them)."""
    torch.manual_seed(0)
    impl = "grouped_mm" if torch.device(device).type == "cuda" else "auto"
    layer = MoELayer(d, E, k, f, aux_loss_coef=0.0, z_loss_coef=0.0, impl=impl)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, d ** -0.5)
        m = torch.randn(d)
        m /= m.norm()
        if skew:
            layer.router.gate.weight[: max(1, E // 8)] += skew * m  # experts of rank 0 win more often
    return layer.to(device, dtype).eval(), m.to(device, dtype)


def tokens(T, d, m, device, dtype, seed) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(T, d, generator=g) + m.cpu().float()).to(device, dtype)


def speed(shape: str, T: int, rates: list[float], args, device, dtype) -> list[dict]:
    """Forward time of the layer without partition and, sparsified, at each drop rate (timed interleaved)."""
    d, f, E, k = SHAPES[shape]
    base, m = make_layer(d, f, E, k, device, dtype)
    x = tokens(T, d, m, device, dtype, seed=1)
    with torch.no_grad():
        sparse = sparsify(copy.deepcopy(base), [tokens(T, d, m, device, dtype, seed=2)], 0.0, args.parts)
        achieved, layer_fns, expert_fns = {}, {"base": lambda: base(x)}, {"base": expert_call(base, x)}
        for rate in rates:
            set_drop_rate(sparse, rate)
            reset_drop_stats(sparse)
            expert_fns[rate] = expert_call(sparse, x)
            achieved[rate] = drop_stats(sparse)["drop_rate"]
            layer_fns[rate] = lambda r=rate: (set_drop_rate(sparse, r), sparse(x))
        t_layer = interleaved(layer_fns, device, args.reps)
        t_exp = interleaved(expert_fns, device, args.reps)
        t_graph = {}
        if device == "cuda" and not args.no_graphs:  # the same layers replayed as CUDA graphs: no launch cost
            graph_fns = {"base": graphed(lambda: base(x))}
            for rate in rates:
                set_drop_rate(sparse, rate)  # the rate is baked into the captured kernels
                graph_fns[rate] = graphed(lambda: sparse(x))
            t_graph = interleaved(graph_fns, device, args.reps)
        t_fused = {}
        if fused_inference(x):  # the fused MoE GEMM's prefill-sized mode (moe/fused.py), both layers, same run
            fused_fns = {"base": fused_call(base, x, lambda: base(x))}
            for rate in rates:
                fused_fns[rate] = fused_call(sparse, x, lambda r=rate: (set_drop_rate(sparse, r), sparse(x)))
            t_fused = interleaved(fused_fns, device, args.reps)
    rows = []
    for rate in rates:
        rows.append({"study": "speed", "shape": shape, "tokens": T, "target": rate, "drop_rate": achieved[rate],
                     "ms": t_layer[rate] * 1e3, "ms_no_partition": t_layer["base"] * 1e3,
                     "ratio": t_layer[rate] / t_layer["base"], "ideal": 1 - achieved[rate],
                     "experts_ms": t_exp[rate] * 1e3, "experts_ms_no_partition": t_exp["base"] * 1e3,
                     "experts_ratio": t_exp[rate] / t_exp["base"],
                     **({"graph_ms": t_graph[rate] * 1e3, "graph_ms_no_partition": t_graph["base"] * 1e3,
                         "graph_ratio": t_graph[rate] / t_graph["base"]} if t_graph else {}),
                     **({"fused_ms": t_fused[rate] * 1e3, "fused_ms_no_partition": t_fused["base"] * 1e3,
                         "fused_ratio": t_fused[rate] / t_fused["base"],
                         "fused_vs_grouped": t_fused[rate] / t_layer["base"]} if t_fused else {}),
                     "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
                     "commit": os.environ.get("MOESTACK_COMMIT")})  # device copies have no .git: the caller says
        print(rows[-1], flush=True)
    return rows


def fused_call(layer: MoELayer, x: torch.Tensor, fn):
    """fn with the layer's routed experts through the fused MoE GEMM for every batch size (fused_rows)."""
    def run():
        layer.fused_rows = x.shape[0] * layer.router.top_k
        try:
            return fn()
        finally:
            layer.fused_rows = 0
    return run


def graphed(fn):
    """fn captured as a CUDA graph (after warm-up on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def expert_call(layer: MoELayer, x: torch.Tensor):
    """The layer's expert GEMMs alone on the rows its current drop rate keeps (dispatched once, here)."""
    d = layer.dispatcher.dispatch(x, layer.router(x)).wait()
    return lambda: layer.experts(d.x, d.counts)


def interleaved(fns: dict, device, reps: int, warmup: int = 2) -> dict:
    """Median seconds of each fn, timing them round-robin so that drifting background load hits all alike;
    each round starts one fn later and every other round runs backwards, so that no fn always comes first or
    follows the same one (GPU clocks after a heavy call would favour some positions)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    keys = list(fns)
    for rep in range(reps):
        order = keys[rep % len(keys):] + keys[: rep % len(keys)]
        for key in order[::-1] if rep % 2 else order:
            fn = fns[key]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


# ---- (iii) load-aware vs uniform ------------------------------------------------------------------
def load_study(shape: str, T: int, rate: float, args, device, dtype) -> list[dict]:
    """Per-rank kept work and expert time under skewed routing: no drop, uniform, load-aware."""
    d, f, E, k = SHAPES[shape]
    G, P = args.ranks, args.parts
    ranks = contiguous_ranks(E, G)
    base, m = make_layer(d, f, E, k, device, dtype, skew=args.skew)
    x = tokens(T, d, m, device, dtype, seed=1)
    with torch.no_grad():
        counts = torch.bincount(base.router(x).expert_ids.flatten(), minlength=E)
        sparse = sparsify(copy.deepcopy(base), [tokens(T, d, m, device, dtype, seed=2)], 0.0, P)
        kept, achieved = {"no drop": per_rank(counts, ranks, G)}, {"no drop": 0.0}
        fns = rank_calls("no drop", base.experts, base.dispatcher.dispatch(x, base.router(x)).wait(), ranks, G)
        for policy in ("uniform", "load-aware"):
            set_drop_rate(sparse, rate, load_aware=policy == "load-aware", expert_rank=[ranks])
            reset_drop_stats(sparse)
            disp = sparse.dispatcher.dispatch(x, sparse.router(x)).wait()
            achieved[policy] = drop_stats(sparse)["drop_rate"]
            kept[policy] = per_rank(work_per_expert(disp.counts), ranks, G) / P  # in whole-expert rows
            fns.update(rank_calls(policy, sparse.experts, disp, ranks, G))
        times = interleaved(fns, device, args.reps)
    loads = per_rank(counts, ranks, G)
    rows = []
    for policy in kept:
        rank_ms = [times.get((policy, r), 0.0) * 1e3 for r in range(G)]
        rows.append({"study": "load", "shape": shape, "tokens": T, "ranks": G, "policy": policy,
                     "drop_rate": achieved[policy], "load_max_over_mean": (loads.max() / loads.mean()).item(),
                     "kept_work_per_rank": [round(v, 1) for v in kept[policy].tolist()],
                     "max_rank_work": kept[policy].max().item(), "max_rank_ms": max(rank_ms),
                     "rank_ms": [round(t, 3) for t in rank_ms], "device": device_name(device),
                     "dtype": str(dtype).replace("torch.", "")})
    for r in rows:
        r["work_speedup_vs_no_drop"] = rows[0]["max_rank_work"] / r["max_rank_work"]
        r["speedup_vs_no_drop"] = rows[0]["max_rank_ms"] / r["max_rank_ms"]
        print(r, flush=True)
    return rows


def per_rank(counts: torch.Tensor, ranks: list[int], G: int) -> torch.Tensor:
    """Sum of per-expert counts [E] over each rank's experts: [G]."""
    return torch.zeros(G, device=counts.device).index_add_(0, torch.tensor(ranks, device=counts.device), counts.float())


def rank_calls(policy: str, experts: GroupedExperts, d, ranks: list[int], G: int) -> dict:
    """{(policy, rank): fn} running one simulated rank's expert compute alone on its experts' rows.

    d.counts: [E] rows per expert (plain layer, d.x [N, D]) or [P, E] rows per (parts run, expert)
    (PartExperts, d.x [P, R, D] padded segments). Each rank runs its rows packed (`PartExperts` packed layout)."""
    E = len(ranks)
    counts = d.counts.view(-1, E)  # [S, E] row segments
    segs = d.x if d.x.dim() == 3 else d.x.unsqueeze(0)  # [S', R, D]
    flat = counts.flatten() if segs.shape[0] == 1 else counts  # one segment: experts follow on across j
    ends = torch.cumsum(flat, -1).view_as(counts).tolist()
    sizes = counts.tolist()
    fns = {}
    for r in range(G):
        ids = [e for e, rk in enumerate(ranks) if rk == r]
        x_r = torch.cat([segs[s if segs.shape[0] > 1 else 0][ends[s][e] - sizes[s][e]:ends[s][e]]
                         for s in range(len(sizes)) for e in ids])
        if x_r.shape[0]:
            mine = slice_experts(experts, ids)
            c = counts[:, ids] if isinstance(experts, PartExperts) else counts[0, ids]
            fns[(policy, r)] = lambda mine=mine, x_r=x_r, c=c: mine(x_r, c)
    return fns


def slice_experts(experts: GroupedExperts, ids: list[int]) -> GroupedExperts:
    """The experts `ids` of a GroupedExperts or PartExperts, as one of the same kind."""
    with torch.device("meta"):
        if isinstance(experts, PartExperts):
            out = PartExperts(len(ids), experts.d_model, experts.d_ff, experts.parts, experts.impl)
        else:
            out = GroupedExperts(len(ids), experts.d_model, experts.d_ff, experts.impl)
    out.w13 = torch.nn.Parameter(experts.w13.detach()[ids])
    out.w2 = torch.nn.Parameter(experts.w2.detach()[ids])
    return out


# ---- (iv) real expert parallelism (torchrun) -----------------------------------------------------
def ep_study(shape: str, T: int, rate: float, args, dtype) -> list[dict]:
    """MoE-layer time under real EP over torchrun's ranks (skewed routing): no drop, uniform, load-aware."""
    import torch.distributed as dist

    from moestack.config import ParallelConfig
    from moestack.inference.ep import shard_sparse
    from moestack.parallel.ep import shard_layer
    from moestack.parallel.mesh import init_parallel, shutdown, world_from_env
    from moestack.placement.placement import Placement

    d, f, E, k = SHAPES[shape]
    ctx = init_parallel(ParallelConfig(ep=world_from_env()[1]), "auto")
    dev = ctx.device
    base, m = make_layer(d, f, E, k, dev, dtype, skew=args.skew)  # the same weights on every rank
    placement = Placement.contiguous(1, E, ctx.ep)
    with torch.no_grad():
        sparse = sparsify(copy.deepcopy(base), [tokens(T, d, m, dev, dtype, seed=100)], 0.0, args.parts)
        base.dispatcher = shard_layer(base, ctx, placement, 0)
        shard_sparse(sparse, ctx, placement)
        x = tokens(T, d, m, dev, dtype, seed=1 + ctx.rank)  # each rank routes its own tokens
        fns = {"no drop": lambda: base(x),
               "uniform": lambda: (set_drop_rate(sparse, rate), sparse(x)),
               "load-aware": lambda: (set_drop_rate(sparse, rate, load_aware=True), sparse(x))}
        reset_drop_stats(sparse)
        times = interleaved(fns, dev, args.reps)
        rows = []
        for policy, sec in times.items():
            t = torch.tensor([sec], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.ep_group)  # the slowest rank's median
            rows.append({"study": "ep", "shape": shape, "tokens_per_rank": T, "ranks": ctx.ep, "policy": policy,
                         "ms": t.item() * 1e3, "device": device_name(dev), "dtype": str(dtype).replace("torch.", "")})
        for policy in ("uniform", "load-aware"):
            set_drop_rate(sparse, rate, load_aware=policy == "load-aware")
            reset_drop_stats(sparse)
            sparse(x)
            st = torch.tensor([drop_stats(sparse)["skipped"], drop_stats(sparse)["total"]], device=dev)
            dist.all_reduce(st, group=ctx.ep_group)
            next(r for r in rows if r["policy"] == policy)["drop_rate"] = (st[0] / st[1]).item()
    rows[0]["drop_rate"] = 0.0
    for r in rows:
        r["speedup_vs_no_drop"] = rows[0]["ms"] / r["ms"]
    shutdown(ctx)
    return rows if ctx.is_main else []


# ---- main -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="trained run for the quality study")
    ap.add_argument("--study", default="quality,speed,load",
                    help="any of quality, speed, load; or ep alone, under torchrun --nproc_per_node N")
    ap.add_argument("--rates", default="0,0.1,0.25,0.4,0.5")
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--batches", type=int, default=16, help="validation batches (quality)")
    ap.add_argument("--eval-batch", type=int, default=0,
                    help="sequences per validation batch (quality; default the run's batch size): the decode batch "
                         "dualsparse+whole drops whole sub-experts over")
    ap.add_argument("--shapes", default=None, help="speed/load shapes (GPU default mixtral,qwen3_moe; CPU: cpu)")
    ap.add_argument("--tokens", default=None, help="tokens per forward, comma-separated (GPU 16384, CPU 8192)")
    ap.add_argument("--ranks", type=int, default=4, help="simulated EP ranks (load study, load-aware quality)")
    ap.add_argument("--skew", type=float, default=2.0, help="router skew towards rank 0's experts (load study)")
    ap.add_argument("--load-rate", type=float, default=0.25, help="drop rate of the load study")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-graphs", action="store_true", help="speed: skip the CUDA-graph replay timings")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = (args.shapes or ("mixtral,qwen3_moe" if device == "cuda" else "cpu")).split(",")
    token_counts = [int(t) for t in (args.tokens or ("16384" if device == "cuda" else "8192")).split(",")]
    T = token_counts[0]
    rates = [float(r) for r in args.rates.split(",")]
    studies = args.study.split(",")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    if studies == ["ep"]:
        for shape in shapes:
            rows = ep_study(shape, T, args.load_rate, args, dtype)
            if rows:
                print_table(rows, ["shape", "ranks", "policy", "drop_rate", "ms", "speedup_vs_no_drop"])
                write_results("dualsparse", rows)
        return
    if "quality" in studies:
        if not args.run_dir:
            raise SystemExit("the quality study needs --run-dir (a run folder from `moestack train`)")
        rows = quality(args.run_dir, rates, args, device)
        print_table(rows, ["method", "target", "drop_rate", "weights_read", "val_loss", "increase_pct", "perplexity"])
        write_results("dualsparse", rows)
        print("plot:", plot_quality(rows, out / "dualsparse_quality.png"))
    for shape in shapes:
        for n in token_counts if "speed" in studies else []:
            rows = speed(shape, n, rates, args, device, dtype)
            print_table(rows, ["shape", "tokens", "target", "drop_rate", "ms", "ms_no_partition", "ratio", "ideal",
                               "experts_ms", "experts_ms_no_partition", "experts_ratio", "graph_ms",
                               "graph_ms_no_partition", "graph_ratio", "fused_ms", "fused_ms_no_partition",
                               "fused_ratio", "fused_vs_grouped"])
            write_results("dualsparse", rows)
            if device == "cuda":
                torch.cuda.empty_cache()
        if "load" in studies:
            rows = load_study(shape, T, args.load_rate, args, device, dtype)
            print_table(rows, ["shape", "ranks", "policy", "drop_rate", "load_max_over_mean", "max_rank_work",
                               "work_speedup_vs_no_drop", "max_rank_ms", "speedup_vs_no_drop"])
            write_results("dualsparse", rows)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
