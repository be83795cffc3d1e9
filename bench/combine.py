"""Token permutation round trip of an MoE layer: dispatch gather + combine, forward and forward+backward.

    python bench/combine.py                  # GPU: Mixtral-, DBRX-, OLMoE-, Qwen3-MoE-like shapes, bf16
    python bench/combine.py --quick          # CPU smoke run

Compares, in one run and on the same routing, moestack's path (`expand_rows` gather, `unpermute`: gather
into token order and a weighted sum per token) with its two weighted-sum variants (a batched [1, k] x
[k, D] product; multiply and sum) and with the scatter path moestack used before (autograd indexing,
zero-filled [T*k, D] buffer, index_copy, broadcast multiply, sum). The experts are a stand-in (y = 2x),
so only data movement counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, time_fn, write_results  # noqa: E402

from moestack.moe.dispatch import expand_rows, gather_rows, inverse_order, sort_by_expert, unpermute  # noqa: E402

SHAPES = {"mixtral": (4096, 8, 2), "dbrx": (6144, 16, 4), "olmoe": (2048, 64, 8), "qwen3_moe": (2048, 128, 8),
          "cpu": (256, 8, 2)}


def _dispatched(x, ids, E):
    """The gather dispatch and the stand-in experts (y = 2x): (y, order, inverse)."""
    T, k = ids.shape
    order, _ = sort_by_expert(ids, E)
    inverse, _ = inverse_order(order, T * k)
    return expand_rows(x, order, inverse, None, k) * 2, order, inverse


def moestack_path(x, ids, w, E):
    """moestack's LocalDispatcher path (multiply-and-sum at k <= 4, bmm above)."""
    y, order, inverse = _dispatched(x, ids, E)
    return unpermute(y, order, w, ids.numel(), inverse)


def gather_bmm(x, ids, w, E):
    y, order, inverse = _dispatched(x, ids, E)
    per_choice = gather_rows(y, inverse, order).view(*ids.shape, -1)
    return torch.bmm(w.to(y.dtype).unsqueeze(1), per_choice).squeeze(1)


def gather_mul_sum(x, ids, w, E):
    y, order, inverse = _dispatched(x, ids, E)
    per_choice = gather_rows(y, inverse, order).view(*ids.shape, -1)
    return (per_choice * w.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def scatter_before(x, ids, w, E):
    T, k = ids.shape
    order, _ = sort_by_expert(ids, E)
    y = x[order // k] * 2
    full = y.new_zeros(T * k, y.shape[-1]).index_copy(0, order, y)
    return (full.view(T, k, -1) * w.to(y.dtype).unsqueeze(-1)).sum(dim=1)


PATHS = {"moestack": moestack_path, "gather + bmm": gather_bmm, "gather + mul + sum": gather_mul_sum,
         "scatter (before)": scatter_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--tokens", default=None, help="comma list (GPU default 8192,32768)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = (args.shapes or ("mixtral,dbrx,olmoe,qwen3_moe" if device == "cuda" else "cpu")).split(",")
    token_list = [int(t) for t in (args.tokens or ("8192,32768" if device == "cuda" else "1024")).split(",")]
    rows = []
    for shape in shapes:
        D, E, k = SHAPES[shape]
        for T in token_list:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_(True)
            ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.to(device)
            w = torch.rand(T, k, generator=g).to(device).requires_grad_(True)
            grad = torch.randn(T, D, device=device, dtype=dtype)
            ref = None
            for name, fn in PATHS.items():
                out = fn(x, ids, w, E)
                ref = out if ref is None else ref
                err = (out.float() - ref.float()).abs().max().item()
                with torch.no_grad():
                    fwd = time_fn(lambda: fn(x, ids, w, E), device, reps=args.reps)
                both = time_fn(lambda: torch.autograd.backward(fn(x, ids, w, E), grad), device, reps=args.reps)
                rows.append({"bench": "combine", "shape": shape, "tokens": T, "d_model": D, "experts": E, "top_k": k,
                             "path": name, "forward_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "max_abs_diff": err,
                             "device": device_name(device), "dtype": str(dtype).replace("torch.", "")})
                print(rows[-1], flush=True)
    print_table(rows, ["shape", "tokens", "path", "forward_ms", "fwd_bwd_ms", "max_abs_diff"])
    write_results("combine", rows)


if __name__ == "__main__":
    main()
