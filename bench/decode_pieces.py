"""The batch-8 decode step's pieces, one at a time, at the serving bench's real shapes (GPU; issue 13).

    python3 bench/decode_pieces.py                   # OLMoE-1B-7B and Qwen3-30B-A3B shapes, batch 8
    python3 bench/decode_pieces.py --shapes tiny     # toy sizes: a CPU smoke run of the same code

`bash bench/suite.sh profile_decode` says where a decode step's GPU time goes; this says how fast each piece
could go. Each piece runs 50 times inside one CUDA graph (as the engine replays its steps) and is timed
between CUDA events: microseconds per call, with the bytes it must read and the rate that makes (TB/s).
- dense projections at 8 rows (qkv, out, router gate, LM head): cuBLAS (`F.linear`) against the fused MoE
  GEMM run as one expert (`fused.few_rows_linear`, weights read in place through their strides), each call on
  the next of enough weight copies to overflow L2 (a step reads every other layer's weights in between); and
  the out projection with the residual add + norm after it: cuBLAS, or split-K partials that the add sums;
- the expert GEMMs of one MoE layer on a routed batch-8 step (`_moe_gemm` for w13 and w2 separately, then
  `fused.fused_experts` whole), with the bytes of the experts the step touches;
- paged decode attention at 192 and 2048 keys per sequence: key tiles of 32, 64 (the engine's) and 128, and
  split-KV over 2 to 8 programs per (sequence, KV head) (the engine picks `attention_triton.decode_tiles`);
- greedy sampling's argmax over the vocabulary: torch on fp32 logits, torch after the fp32 copy of the LM head's
  output, and `serve/argmax_triton.py` on that output as it is;
- the gate/up GEMM with and without the SwiGLU epilogue (`moe_gemm(swiglu_f=)`);
- the router: cuBLAS gate, top-k, then the fused MoE's plan (three kernels); cuBLAS then `router_triton.topk_plan`.
Results: one JSON line per piece in $OUT/decode_pieces.jsonl (device runs) or bench/results/.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "src"); sys.path.insert(0, "bench")
from common import device_name, print_table, write_results  # noqa: E402

SHAPES = {  # d_model, heads, kv heads, head size, vocab, experts, top-k, expert width (serve.py's CONFIGS); keys
    "olmoe": dict(D=2048, H=16, Hkv=16, hd=128, V=50304, E=64, k=8, F=1024, ctx=(192, 2048)),
    "qwen3_moe": dict(D=2048, H=32, Hkv=4, hd=128, V=151936, E=128, k=8, F=768, ctx=(192, 2048)),
    "tiny": dict(D=64, H=4, Hkv=2, hd=16, V=512, E=16, k=4, F=32, ctx=(32,)),
}


def time_graphed(fn, device, calls: int = 50, reps: int = 10) -> float:
    """Seconds per call of fn, `calls` of them captured in one CUDA graph (after a warm-up that compiles and
    autotunes), median over reps replays. Off CUDA: the median of plain calls."""
    import statistics
    import time

    fn()
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


COLD_BYTES = 160 * 2**20  # past an H100's 50 MB and an H200's 60 MB of L2


def rotating(weights: list[torch.Tensor], fn):
    """A call that runs fn on the next of `weights` each time (a graph's captured calls each keep their own)."""
    turn = iter(range(1 << 62))
    return lambda: fn(weights[next(turn) % len(weights)])


def pieces(name: str, s: dict, device, dtype, T: int) -> list[dict]:
    from moestack.moe import fused
    from moestack.moe.experts import fused_inference, sm_count
    from moestack.moe.fused_triton import moe_gemm
    from moestack.serve.attention_triton import paged_decode

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(device, dtype)  # noqa: E731
    D, H, Hkv, hd, V, E, k, Fw = (s[key] for key in ("D", "H", "Hkv", "hd", "V", "E", "k", "F"))
    el = torch.empty(0, dtype=dtype).element_size()
    triton_ok = fused_inference(torch.empty(0, device=device))
    rows = []

    def add(piece: str, variant: str, seconds: float, nbytes: int):
        rows.append(dict(shape=name, piece=piece, variant=variant, us=seconds * 1e6, mbytes=nbytes / 1e6,
                         tbps=nbytes / seconds / 1e12, device=device_name(device), batch=T))

    x = rnd(T, D)
    for piece, n_out, n_in in (("qkv", (H + 2 * Hkv) * hd, D), ("out", D, H * hd), ("router", E, D), ("lm_head", V, D)):
        # as in a step, where the layers' other weights pass through L2 between two reads of this one: each call
        # reads the next of enough copies to overflow the cache (COLD_BYTES in all)
        copies = min(256, max(1, -(-COLD_BYTES // (n_out * n_in * el))))
        ws = [rnd(n_out, n_in) for _ in range(copies)]
        xi = x if n_in == D else rnd(T, n_in)
        nbytes = ws[0].numel() * el
        add(piece, "cublas", time_graphed(rotating(ws, lambda w: F.linear(xi, w)), device), nbytes)
        if triton_ok:
            add(piece, "moe_gemm", time_graphed(rotating(ws, lambda w: fused.few_rows_linear(xi, w)), device), nbytes)
        if triton_ok and piece == "out" and device != "cpu":  # with the residual add + norm after it, as served
            from moestack.serve.norm_triton import add_rms_norm

            h, nw = rnd(T, D), rnd(D)
            splits = fused.few_rows_splits(n_out, n_in, sm_count(xi))
            add("out_add_norm", "cublas", time_graphed(rotating(ws, lambda w: add_rms_norm(h, F.linear(xi, w), nw, 1e-6)),
                                                       device), nbytes)
            add("out_add_norm", f"moe_gemm_split{splits}", time_graphed(rotating(ws, lambda w: add_rms_norm(
                h, fused.few_rows_linear(xi, w, splits).transpose(0, 1), nw, 1e-6)), device), nbytes)
        del ws

    # one MoE layer's experts on a routed step: uniform random routing, as the bench's random-weight routers give
    w13, w2 = rnd(E, D, 2 * Fw), rnd(E, Fw, D)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    weights = torch.full((T, k), 1.0 / k, device=device)
    touched = int(ids.unique().numel())
    if triton_ok:
        plan = fused.align(ids.flatten(), E)
        h = x.new_empty(T * k, 2 * Fw)
        act = rnd(T * k, Fw)
        out = x.new_empty(T * k, D)
        wf = weights.reshape(-1).float().contiguous()
        add("experts_w13", "moe_gemm", time_graphed(lambda: moe_gemm(
            x, w13, h, plan, n=2 * Fw, k=D, a_div=k, stride_bk=w13.stride(1), stride_bn=w13.stride(2)), device),
            touched * D * 2 * Fw * el)
        act_out = x.new_empty(T * k, Fw)
        add("experts_w13", "moe_gemm_swiglu", time_graphed(lambda: moe_gemm(
            x, w13, act_out, plan, n=Fw, k=D, a_div=k, stride_bk=w13.stride(1), stride_bn=w13.stride(2), swiglu_f=Fw),
            device), touched * D * 2 * Fw * el)
        add("experts_w2", "moe_gemm", time_graphed(lambda: moe_gemm(
            act, w2, out, plan, n=D, k=Fw, a_div=1, stride_bk=w2.stride(1), stride_bn=w2.stride(2), weights=wf), device),
            touched * Fw * D * el)
        add("experts", "fused_experts", time_graphed(lambda: fused.fused_experts(x, ids, weights, w13, w2), device),
            touched * 3 * D * Fw * el)
    del w13, w2

    # the router's top-k and the fused MoE's plan: two kernels (and the counts' zeroing) or one
    if triton_ok:
        from moestack.moe import router_triton
        from moestack.moe.router import plan_rows

        gate = rnd(E, D)
        cap = plan_rows(T * k, E, fused.BLOCK_M)

        def apart():
            ids, _, _ = router_triton.topk_softmax(F.linear(x, gate), k, True)
            return fused.align(ids.flatten(), E)

        nbytes = gate.numel() * el
        add("route_and_plan", "cublas_topk_align", time_graphed(apart, device), nbytes)
        add("route_and_plan", "cublas_topk_plan", time_graphed(
            lambda: router_triton.topk_plan(F.linear(x, gate), k, True, None, fused.BLOCK_M, cap), device), nbytes)

    # paged decode: T sequences of `ctx` keys each, blocks of 16 positions, scattered
    if triton_ok:
        page = 16
        for ctx in s["ctx"]:
            nb = T * (ctx // page)
            kc, vc = rnd(nb + 1, page, Hkv, hd), rnd(nb + 1, page, Hkv, hd)
            tables = torch.randperm(nb, generator=g).view(T, -1).to(device, torch.int32)
            lens = torch.full((T,), ctx, dtype=torch.int32, device=device)
            q = rnd(T, H, hd)
            for block_n, splits in ((64, 1), (128, 1), (64, 2), (64, 4), (64, 8), (32, 8), (128, 2), (128, 4)):
                add(f"paged_decode_{ctx}", f"block_n{block_n}" + (f"_splits{splits}" if splits > 1 else ""),
                    time_graphed(lambda: paged_decode(q, kc, vc, tables, lens, block_n=block_n, splits=splits), device),
                    2 * T * ctx * Hkv * hd * el)
            del kc, vc

    logits = torch.randn(T, V, generator=g).to(device)
    add("argmax", "torch", time_graphed(lambda: logits.argmax(dim=-1), device), logits.numel() * 4)
    raw = logits.to(dtype)
    add("argmax", "torch_float_then_argmax", time_graphed(lambda: raw.float().argmax(dim=-1), device), raw.numel() * raw.element_size())
    if triton_ok:
        from moestack.serve.argmax_triton import argmax_rows

        add("argmax", "triton_model_dtype", time_graphed(lambda: argmax_rows(raw), device), raw.numel() * raw.element_size())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="olmoe,qwen3_moe", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    rows = []
    with torch.inference_mode():
        for name in args.shapes.split(","):
            got = pieces(name, SHAPES[name], device, dtype, args.batch)
            print_table(got, ["shape", "piece", "variant", "us", "mbytes", "tbps"])
            rows += got
    print(f"results: {write_results('decode_pieces', rows)}")


if __name__ == "__main__":
    main()
