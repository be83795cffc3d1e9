"""Step-time model of EP vs FSSDP vs FSSDP-RM (Hecate) at 8-64 GPUs, from routing traces.

    python3 bench/fssdp_sim.py [--trace run.npz ...] [--gpus 8 16 32 64] [--steps 20] [--tokens 8192]

Per MoE layer and training step, on each GPU: expert GEMM time (forward + backward = 3 x forward) for its
rows, from per-expert GEMM times *measured in this run* on this device at the model's shapes; all-to-all
time = the GPU's bytes out or in (the larger) over the link bandwidth (dispatch + combine, forward +
backward); FSSDP adds the SparseAllGather / SparseReduceScatter bytes that do not fit under the layer's
attention (forward; backward = 2 x forward; attention measured here too), and RM gathers again in backward.
The step's MoE time is the slowest GPU's; attention time is the same for all three and added.
Loads: each step's expert choices are drawn from the trace's per-layer distribution (multinomial over
tokens x GPUs x k), so FSSDP's sliding-window prediction (w = 5) meets real step-to-step noise; owners from
the heterogeneous plan, copies from `materialize` with the paper's overlap budget
t = T_attn x bandwidth / expert bytes (capped by --max-copies), both from parallel/fssdp_plan.py.
Memory per GPU: expert parameters + fp32 master + AdamW moments (16 bytes / parameter) for owned experts, plus
bf16 copies (all layers' until backward; RM: one layer's at a time).
Link bandwidths are inputs (--links): all-to-all bus bandwidth measured on two H200s on 2026-11-23 at
256 MiB (../shared/SERVING.md): NVLink 282 GB/s, NCCL_P2P_DISABLE=1 (inter-node-like) 24 GB/s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moestack.parallel.fssdp_plan import device_loads, heterogeneous_sharding, materialize  # noqa: E402
from moestack.placement.synthetic import synthetic_trace  # noqa: E402
from moestack.placement.trace import RoutingTrace  # noqa: E402

# name: (d_model, d_ff per expert, experts, top_k, heads, kv heads, head dim)
SHAPES = {
    "mixtral": (4096, 14336, 8, 2, 32, 8, 128),
    "olmoe": (2048, 1024, 64, 8, 16, 16, 128),
    "qwen3": (2048, 768, 128, 8, 32, 4, 128),
}
LINKS = {"nvlink": 280e9, "internode": 24e9}  # bytes/s, all-to-all bus bandwidth (see the module docstring)


def timer(device: torch.device):
    """Median seconds of fn() over reps, synchronised on CUDA."""
    def run(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    return run


def measure(shape: tuple, tokens: int, device: torch.device, dtype: torch.dtype, scale: int) -> dict:
    """Forward times measured here: one expert's SwiGLU GEMMs at a ladder of rows, and one attention layer
    (projections + SDPA) over `tokens` tokens (sequences of 4096, causal). `scale` divides every dimension
    (CPU smoke runs)."""
    D, F, _, _, H, KV, hd = shape
    D, F, H, KV = D // scale, F // scale, max(1, H // scale), max(1, KV // scale)
    t = timer(device)
    w13 = torch.randn(D, 2 * F, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(F, D, device=device, dtype=dtype) * 0.02
    ladder = [2 ** i for i in range(4, int(math.log2(max(32, tokens * 4))) + 1)]
    gemm = []
    for n in ladder:
        x = torch.randn(n, D, device=device, dtype=dtype)
        gemm.append(t(lambda: (torch.nn.functional.silu((x @ w13)[:, :F]) * (x @ w13)[:, F:]) @ w2))
    seq = min(4096, tokens)
    b = max(1, tokens // seq)
    wq = torch.randn(D, (H + 2 * KV) * hd, device=device, dtype=dtype) * 0.02
    wo = torch.randn(H * hd, D, device=device, dtype=dtype) * 0.02
    xa = torch.randn(b * seq, D, device=device, dtype=dtype)

    def attention():
        qkv = (xa @ wq).view(b, seq, H + 2 * KV, hd).transpose(1, 2)
        q, k, v = qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b * seq, H * hd) @ wo
    return {"ladder": ladder, "gemm_s": gemm, "attn_s": t(attention), "d_model": D, "d_ff": F}


def gemm_time(m: dict, rows: np.ndarray) -> np.ndarray:
    """Forward seconds of one expert at `rows` rows: linear interpolation on the measured ladder, beyond its
    top at the top's seconds per row (the GEMM is compute-bound there); 0 rows: 0."""
    rows = np.asarray(rows, dtype=np.float64)
    top, t_top = m["ladder"][-1], m["gemm_s"][-1]
    t = np.where(rows <= top, np.interp(rows, m["ladder"], m["gemm_s"]), t_top * rows / top)
    return np.where(rows > 0, t, 0.0)


def simulate(trace: RoutingTrace, shape: tuple, m: dict, gpus: int, link: float, tokens: int, steps: int,
             window: int, max_copies: int, seed: int) -> dict:
    L, E = trace.counts.shape
    k = trace.top_k
    D, F = m["d_model"], m["d_ff"]
    expert_params = 3 * D * F
    row_bytes = D * 2  # bf16 rows
    copy_bytes = expert_params * 2  # a bf16 copy
    probs = trace.counts / trace.counts.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    ep = min(gpus, E)  # EP degree; beyond E GPUs, EP groups of E GPUs replicate (data parallel)
    ep_owner = np.array([[e * ep // E for e in range(E)]] * L)
    copies_budget = min(max_copies, int(m["attn_s"] * link / copy_bytes))
    history: list[np.ndarray] = []
    owner = heterogeneous_sharding(np.ones((L, E)), gpus)
    totals = {"ep": 0.0, "fssdp": 0.0, "fssdp_rm": 0.0}
    attn = 3 * m["attn_s"] * L  # forward + backward, every GPU, the same in all three
    for step in range(steps):
        loads = np.stack([rng.multinomial(tokens * gpus * k, probs[l]) for l in range(L)]).astype(float)
        if step == steps // 2 and history:  # one re-shard mid-run from the loads so far (the paper's periodic)
            owner = heterogeneous_sharding(np.sum(history, axis=0), gpus)
        predicted = np.mean(history[-window:], axis=0) if history else None
        step_t = {"ep": attn, "fssdp": attn, "fssdp_rm": attn}
        for l in range(L):
            # EP: rows per GPU of its EP group (the group holds all E experts and 1/(gpus/ep) of the tokens)
            ep_rows = loads[l] * ep / gpus
            per_gpu = np.zeros(ep)
            np.add.at(per_gpu, ep_owner[l], 3 * gemm_time(m, ep_rows))
            a2a = 4 * tokens * k * (1 - 1 / ep) * row_bytes / link  # each GPU sends ~all its choices away
            step_t["ep"] += per_gpu.max() + a2a
            reps = materialize(predicted[l], owner[l], gpus, copies_budget) if predicted is not None else [[]] * gpus
            holders = [[owner[l, e]] + [d for d in range(gpus) if e in reps[d]] for e in range(E)]
            t_gpu = np.zeros(gpus)
            for e in range(E):  # tokens spread evenly over an expert's holders
                share = 3 * gemm_time(m, np.array([loads[l, e] / len(holders[e])]))[0]
                for d in holders[e]:
                    t_gpu[d] += share
            local = np.mean([len(h) / gpus for h in holders])  # choices that find a local copy
            a2a_f = 4 * tokens * k * (1 - max(local, 1 / gpus)) * row_bytes / link
            gathered = max(len(r) for r in reps) * copy_bytes / link
            exposed_fwd = max(0.0, gathered - m["attn_s"])
            exposed_bwd = max(0.0, gathered - 2 * m["attn_s"])  # reduce-scatter under attention backward
            step_t["fssdp"] += t_gpu.max() + a2a_f + exposed_fwd + exposed_bwd
            step_t["fssdp_rm"] += t_gpu.max() + a2a_f + exposed_fwd + max(0.0, 2 * gathered - 2 * m["attn_s"])
        for key in totals:
            totals[key] += step_t[key]
        history.append(loads)
    slots = math.ceil(L * E / gpus)
    copies = [max(len(r) for r in materialize(np.mean(history[-window:], axis=0)[l], owner[l], gpus, copies_budget))
              for l in range(L)]
    gib = 2 ** -30
    ep_slots = L * math.ceil(E / ep)
    return {
        "gpus": gpus, "copies_budget": copies_budget,
        "step_ms": {key: round(1e3 * v / steps, 3) for key, v in totals.items()},
        "speedup_over_ep": {key: round(totals["ep"] / v, 3) for key, v in totals.items() if key != "ep"},
        "expert_mem_gib": {
            "ep": round(ep_slots * expert_params * 16 * gib, 3),
            "fssdp": round((slots * expert_params * 16 + sum(copies) * copy_bytes * 2) * gib, 3),  # copies + grads
            "fssdp_rm": round((slots * expert_params * 16 + max(copies) * copy_bytes * 2) * gib, 3),
        },
        "imbalance_ep": round(float(np.mean([device_loads(loads[l], ep_owner[l], [[]] * ep, ep).max()
                                              / (loads[l].sum() / ep) for l in range(L)])), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", nargs="*", default=[], help="routing traces (moestack trace); the model shape is "
                    "the one in --shapes whose expert count matches")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skews", nargs="*", type=float, default=[0.0, 0.6, 1.2],
                    help="synthetic Zipf skews per shape (0 = uniform popularity), besides --trace")
    ap.add_argument("--gpus", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8, help="MoE layers of the synthetic traces")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--max-copies", type=int, default=8, help="memory cap on copies per GPU and layer")
    ap.add_argument("--scale", type=int, default=1, help="divide model dims (CPU smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cases = []
    for path in args.trace:
        trace = RoutingTrace.load(path)
        match = [s for s in args.shapes if SHAPES[s][2] == trace.num_experts]
        if not match:
            raise SystemExit(f"{path}: {trace.num_experts} experts; no shape in --shapes has that many "
                             f"({', '.join(f'{s}: {SHAPES[s][2]}' for s in args.shapes)})")
        cases.append((Path(path).name, match[0], trace))
    for s in args.shapes:
        _, _, E, k, *_ = SHAPES[s]
        for skew in args.skews:
            cases.append((f"synthetic skew {skew}", s, synthetic_trace(args.layers, E, k, 4096, skew=skew, seed=1)))
    measured = {s: measure(SHAPES[s], args.tokens, device, dtype, args.scale) for s in {c[1] for c in cases}}
    for s, m in measured.items():
        print(json.dumps({"bench": "fssdp_sim_measure", "shape": s, "device": name, "attn_fwd_ms": round(1e3 * m["attn_s"], 3),
                          "gemm_fwd_ms": dict(zip(m["ladder"], [round(1e3 * g, 4) for g in m["gemm_s"]]))}))
    print(f"{'trace':<22} {'shape':<8} {'link':<9} {'gpus':>4} {'EP max/mean':>11} {'copies':>6} "
          f"{'EP ms':>8} {'FSSDP':>7} {'RM':>7} {'mem EP/F/RM GiB':>20}")
    for label, s, trace in cases:
        for link in args.links:
            for g in args.gpus:
                r = simulate(trace, SHAPES[s], measured[s], g, LINKS[link], args.tokens // args.scale, args.steps,
                             args.window, args.max_copies, seed=g)
                mem = r["expert_mem_gib"]
                print(f"{label:<22} {s:<8} {link:<9} {g:>4} {r['imbalance_ep']:>11.3f} {r['copies_budget']:>6} "
                      f"{r['step_ms']['ep']:>8.2f} {r['speedup_over_ep']['fssdp']:>6.2f}x {r['speedup_over_ep']['fssdp_rm']:>6.2f}x "
                      f"{mem['ep']:>6.2f}/{mem['fssdp']:.2f}/{mem['fssdp_rm']:.2f}")
                print(json.dumps({"bench": "fssdp_sim", "trace": label, "shape": s, "link": link, "device": name,
                                  "tokens_per_gpu": args.tokens, **r}))


if __name__ == "__main__":
    main()
