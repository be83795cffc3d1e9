"""ScMoE vs top-2 under expert parallelism: training step and prefill time, overlap ratio from a profiler trace.

    torchrun --standalone --nproc_per_node 2 bench/scmoe_speed.py                 # NVLink (GPU) or gloo (CPU)
    NCCL_P2P_DISABLE=1 torchrun --standalone --nproc_per_node 2 bench/scmoe_speed.py --link p2p-off
    torchrun --standalone --nproc_per_node 2 bench/scmoe_speed.py --quick         # tiny shapes, CPU smoke run

Compares, in one run: `top2`, `scmoe` (overlap on) and `scmoe` with overlap off. The overlap ratio is the
share of all-to-all kernel time that runs while a compute kernel runs on another stream (GPU traces only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, time_fn, write_results  # noqa: E402

from moestack.config import load_config  # noqa: E402
from moestack.models.transformer import MoETransformer  # noqa: E402
from moestack.parallel.ep import parallelize  # noqa: E402
from moestack.parallel.mesh import init_parallel, shutdown  # noqa: E402

REALISTIC = {"model.d_model": "2048", "model.n_heads": "16", "model.n_layers": "8", "model.seq_len": "2048",
             "moe.num_experts": "16", "moe.d_ff": "4096"}
QUICK = {"model.d_model": "64", "model.n_heads": "4", "model.n_layers": "2", "model.seq_len": "64",
         "moe.num_experts": "4", "moe.d_ff": "128"}


def build(shape: dict, arch: str, ep: int, ctx, dtype):
    cfg = load_config(overrides={**shape, "model.arch": arch, "parallel.ep": str(ep), "moe.aux_loss_coef": "0.01"})
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(ctx.device, dtype)
    parallelize(model, ctx, for_training=False)  # EP only: DDP's all-reduce would blur the comparison
    return model, cfg


def overlap_ratio(prof) -> float | None:
    """Share of NCCL all-to-all kernel time that overlaps a non-NCCL GPU kernel (from the trace events)."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() > 0]
    comm = [e.time_range for e in events if "nccl" in e.name.lower() and "alltoall" in e.name.lower().replace("_", "")]
    if not comm:
        comm = [e.time_range for e in events if "nccl" in e.name.lower()]
    compute = sorted((e.time_range.start, e.time_range.end) for e in events if "nccl" not in e.name.lower())
    if not comm:
        return None
    total = hidden = 0.0
    for c in comm:
        total += c.end - c.start
        for s, t in compute:
            if s >= c.end:
                break
            hidden += max(0.0, min(t, c.end) - max(s, c.start))
    return min(1.0, hidden / total) if total else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--link", default="", help="label for the link regime of this run")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    from moestack.config import ParallelConfig

    ctx = init_parallel(ParallelConfig(ep=world), "auto")
    args.link = args.link or ("nvlink" if ctx.device.type == "cuda" else "gloo (CPU)")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    shape = QUICK if args.quick else REALISTIC
    rows = []
    for arch, overlap in (("top2", True), ("scmoe", True), ("scmoe", False)):
        model, cfg = build(shape, arch, world, ctx, dtype)
        model.overlap = overlap
        idx = torch.randint(0, 256, (args.batch, cfg.model.seq_len), device=ctx.device)

        def train_step():
            _, loss, aux = model(idx, idx)
            (loss + aux).backward()

        def prefill():
            with torch.no_grad():
                model(idx)

        t_train = time_fn(train_step, ctx.device, warmup=3, reps=args.reps)
        t_pre = time_fn(prefill, ctx.device, warmup=3, reps=args.reps)
        ratio = None
        if ctx.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                train_step()
                torch.cuda.synchronize()
            ratio = overlap_ratio(prof)
        name = f"{arch}{'' if overlap else ' (overlap off)'}"
        rows.append({"arch": name, "link": args.link, "world": world, "train_ms": t_train * 1e3,
                     "prefill_ms": t_pre * 1e3, "overlap": ratio, "tokens_per_rank": args.batch * cfg.model.seq_len})
    base = rows[0]
    for r in rows:
        r["train_speedup"] = base["train_ms"] / r["train_ms"]
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
    if ctx.is_main:
        print_table(rows, ["arch", "link", "train_ms", "prefill_ms", "train_speedup", "prefill_speedup", "overlap"])
        write_results("scmoe_speed", rows)
    dist.barrier() if ctx.distributed else None
    shutdown(ctx)


if __name__ == "__main__":
    main()
