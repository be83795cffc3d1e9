"""MoE layer forward+backward time and TFLOP/s against a per-expert loop, Hugging Face's Mixtral block
(eager and grouped_mm experts) and the dense ceiling (one matmul of the same FLOPs), in one run; on a GPU
also moestack without its Triton training-combine kernels.

    python bench/moe_layer.py                # GPU: Mixtral-like and OLMoE-like shapes, 8k and 32k tokens
    python bench/moe_layer.py --quick        # small shapes (CPU smoke run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, time_fn, write_results  # noqa: E402

from moestack.moe.layer import MoELayer  # noqa: E402

SHAPES = {  # name: (d_model, d_ff, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
    "qwen3_moe": (2048, 768, 128, 8),  # Qwen3-30B-A3B's experts
}


def moe_flops(tokens: int, d: int, f: int, k: int) -> float:
    """Forward + backward FLOPs of the expert GEMMs: 3 projections of 2*d*f per token-choice, x3 for backward."""
    return 3 * tokens * k * 3 * 2 * d * f


def ours(d, f, E, k, impl, device, dtype):
    torch.manual_seed(0)
    layer = MoELayer(d, E, k, f, impl=impl, aux_loss_coef=0.01, z_loss_coef=0.001).to(device, dtype)
    return lambda x: sum(layer(x))


def hf_block(d, f, E, k, impl, device, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).to(device, dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def run(x):
        out = block(x.unsqueeze(0))  # HF blocks take [B, S, D]
        return out[0] if isinstance(out, tuple) else out

    return run


def dense_ceiling(tokens, d, f, k, device, dtype):
    """One [T*k, d] x [d, 3f] matmul: the same FLOPs as the experts with no routing and no grouping."""
    w = torch.randn(d, 3 * f, device=device, dtype=dtype, requires_grad=True)
    return lambda x: x.repeat(k, 1) @ w if k > 1 else x @ w


def autograd_combine(fn):
    """fn with moestack's training combine and expansion backward as autograd gathers and sums instead of the
    Triton kernels (moe/dispatch.py TRITON_COMBINE): what the kernels buy, in the same run."""
    import moestack.moe.dispatch as dispatch

    def run(x):
        dispatch.TRITON_COMBINE[0] = False
        try:
            return fn(x)
        finally:
            dispatch.TRITON_COMBINE[0] = True

    return run


def measure_step(fn, x):
    """One forward + backward of fn on x (the step every column times)."""
    def step():
        out = fn(x)
        out.float().sum().backward() if out.dim() else out.backward()
        x.grad = None

    return step


def measure(fn, x, device, reps):
    return time_fn(measure_step(fn, x), device, warmup=3, reps=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral,olmoe")
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke run")
    ap.add_argument("--skip-loop", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"tiny": (128, 256, 8, 2)} if args.quick else {s: SHAPES[s] for s in args.shapes.split(",")}
    token_list = [512] if args.quick else [int(t) for t in args.tokens.split(",")]
    rows = []
    for name, (d, f, E, k) in shapes.items():
        for T in token_list:
            x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
            flops = moe_flops(T, d, f, k)
            cands = {
                "dense ceiling": dense_ceiling(T, d, f, k, device, dtype),
                "moestack grouped_mm": ours(d, f, E, k, "grouped_mm" if device == "cuda" else "auto", device, dtype),
                "hf grouped_mm": hf_block(d, f, E, k, "grouped_mm", device, dtype),
                "hf eager": hf_block(d, f, E, k, "eager", device, dtype),
            }
            if device == "cuda":  # the same layer without the Triton combine kernels: what they buy, same run
                cands["moestack grouped_mm, autograd combine"] = autograd_combine(cands["moestack grouped_mm"])
            if not args.skip_loop:
                cands["moestack loop"] = ours(d, f, E, k, "loop", device, dtype)
            base = None
            for method, fn in cands.items():
                try:
                    sec = measure(fn, x, device, args.reps)
                except (RuntimeError, ValueError, KeyError) as err:  # reported in the table, not hidden
                    rows.append({"shape": name, "tokens": T, "method": method, "error": str(err)[:120]})
                    continue
                base = base or sec
                rows.append({"shape": name, "tokens": T, "method": method, "ms": sec * 1e3,
                             "tflops": flops / sec / 1e12, "pct_of_dense": 100 * base / sec,
                             "device": device_name(device), "dtype": str(dtype).replace("torch.", "")})
                print(rows[-1], flush=True)
            del cands
            if device == "cuda":
                torch.cuda.empty_cache()
    for r in rows:  # speed-up over HF's grouped_mm block at the same shape and tokens (same run)
        hf = next((h["ms"] for h in rows if h["method"] == "hf grouped_mm" and "ms" in h
                   and (h["shape"], h["tokens"]) == (r["shape"], r["tokens"])), None)
        if hf and "ms" in r:
            r["x_hf_grouped_mm"] = hf / r["ms"]
    print_table(rows, ["shape", "tokens", "method", "ms", "tflops", "pct_of_dense", "x_hf_grouped_mm", "error"])
    write_results("moe_layer", rows)


if __name__ == "__main__":
    main()
