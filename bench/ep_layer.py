"""Expert-parallel MoE layer: EP step time vs one GPU doing the same per-GPU work, all-to-all share and bandwidth.

    torchrun --standalone --nproc_per_node 2 bench/ep_layer.py                     # NVLink
    NCCL_P2P_DISABLE=1 torchrun --standalone --nproc_per_node 2 bench/ep_layer.py --link p2p-off
    torchrun --standalone --nproc_per_node 2 bench/ep_layer.py --quick             # CPU smoke run (gloo)

Weak scaling: each rank holds E/G experts and T tokens; the baseline is the same layer with E/G local
experts and T tokens on one device (no communication). The raw NCCL all_to_all_single of the same bytes
is timed in the same run, so our exchange's achieved bandwidth is compared with NCCL's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, time_fn, write_results  # noqa: E402

from moestack.config import ParallelConfig  # noqa: E402
from moestack.moe.layer import MoELayer  # noqa: E402
from moestack.parallel.ep import shard_layer  # noqa: E402
from moestack.parallel.mesh import init_parallel, shutdown  # noqa: E402
from moestack.placement.placement import Placement  # noqa: E402

SHAPES = {"mixtral": (4096, 14336, 8, 2), "olmoe": (2048, 1024, 64, 8), "quick": (64, 128, 8, 2)}


def step_fn(layer, x):
    def run():
        y, aux = layer(x)
        (y.float().square().mean() + aux).backward()
        x.grad = None
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,olmoe")
    ap.add_argument("--tokens", default="4096,16384,32768", help="tokens per rank")
    ap.add_argument("--link", default="")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    ctx = init_parallel(ParallelConfig(ep=world), "auto")
    args.link = args.link or ("nvlink" if ctx.device.type == "cuda" else "gloo (CPU)")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    shapes = ["quick"] if args.quick else args.shapes.split(",")
    tokens = [256] if args.quick else [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in shapes:
        d, f, E, k = SHAPES[name]
        for T in tokens:
            torch.manual_seed(0)
            x = torch.randn(T, d, device=ctx.device, dtype=dtype, requires_grad=True)
            # one device, same per-GPU work: E/G experts, T tokens, no exchange
            local = MoELayer(d, E // world, k, f).to(ctx.device, dtype)
            t_local = time_fn(step_fn(local, x), ctx.device, reps=args.reps)
            del local
            layer = MoELayer(d, E, k, f).to(ctx.device, dtype)
            layer.dispatcher = shard_layer(layer, ctx, Placement.contiguous(1, E, world), 0)
            t_ep = time_fn(step_fn(layer, x), ctx.device, reps=args.reps)
            del layer
            # raw NCCL all_to_all of the same bytes (T*k rows, even splits) for 4 exchanges per step
            buf = torch.randn(T * k, d, device=ctx.device, dtype=dtype)
            out = torch.empty_like(buf)
            t_a2a = time_fn(lambda: dist.all_to_all_single(out, buf, group=ctx.ep_group), ctx.device, reps=args.reps)
            nbytes = buf.numel() * buf.element_size()
            busbw = nbytes * (world - 1) / world / t_a2a / 1e9
            row = {"shape": name, "tokens_per_rank": T, "link": args.link, "world": world,
                   "one_gpu_ms": t_local * 1e3, "ep_ms": t_ep * 1e3, "weak_scaling_eff": t_local / t_ep,
                   "a2a_ms_x4": 4 * t_a2a * 1e3, "a2a_share": min(1.0, 4 * t_a2a / t_ep), "nccl_busbw_GBs": busbw}
            rows.append(row)
            if ctx.is_main:
                print(row, flush=True)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    if ctx.is_main:
        print_table(rows, ["shape", "tokens_per_rank", "link", "one_gpu_ms", "ep_ms", "weak_scaling_eff", "a2a_share", "nccl_busbw_GBs"])
        write_results("ep_layer", rows)
    shutdown(ctx)


if __name__ == "__main__":
    main()
