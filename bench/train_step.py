"""Training step time of a moestack MoE LM under bf16 autocast: MoE rows and experts in bf16 (the default
since 2026-11-28) against the same model with the MoE rows left in the fp32 residual stream's dtype (the
behaviour before), and optionally compiled, all in one run on the same batch.

    python bench/train_step.py                 # GPU: the ScMoE-quality shape (d 512, 8 layers, 8 experts)
    python bench/train_step.py --quick         # tiny shapes, CPU smoke run (bf16 autocast on the CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, time_fn, write_results  # noqa: E402

from moestack.config import load_config  # noqa: E402
from moestack.models.transformer import MoETransformer  # noqa: E402

SHAPES = {
    "quality": {"model.d_model": "512", "model.n_heads": "8", "model.n_layers": "8", "model.seq_len": "256",
                "moe.num_experts": "8", "moe.d_ff": "1024", "train.batch_size": "32"},
    "quick": {"model.d_model": "32", "model.n_heads": "2", "model.n_layers": "2", "model.seq_len": "32",
              "moe.num_experts": "4", "moe.d_ff": "32", "train.batch_size": "4"},
}


def step_fn(model, opt, x, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss, aux = model(x, x)
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", default="top2", choices=["top2", "shared_top1", "scmoe"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time the compiled model (bf16 rows)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(overrides={**SHAPES["quick" if args.quick else "quality"], "model.arch": args.arch})
    x = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.seq_len), device=device)
    variants = [("bf16 rows (default)", True, False), ("fp32 rows (before)", False, False)]
    if args.compile:
        variants.append(("bf16 rows, compiled", True, True))
    rows = []
    for name, bf16_rows, compiled in variants:
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(device)
        for layer in model.moe_layers():
            layer.rows_in_autocast_dtype = bf16_rows
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if compiled else model
        seconds = time_fn(step_fn(forward, opt, x, device), device, warmup=3, reps=args.reps)
        tokens = x.numel()
        rows.append({"bench": "train_step", "variant": name, "arch": args.arch, "device": device_name(device),
                     "tokens": tokens, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds})
    base = next(r["ms"] for r in rows if r["variant"].startswith("fp32"))
    for r in rows:
        r["speedup_vs_fp32_rows"] = base / r["ms"]
    print_table(rows, ["variant", "arch", "tokens", "ms", "tokens_per_s", "speedup_vs_fp32_rows"])
    print(f"results appended to {write_results('train_step', rows)}")


if __name__ == "__main__":
    main()
