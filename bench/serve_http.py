"""The HTTP server's overhead: `moestack serve` against the offline engine, same model, same requests, same run.

    python bench/serve_http.py                         # OLMoE shapes, 4 layers, random weights, GPU
    python bench/serve_http.py --model DIR             # a Hugging Face MoE folder or a moestack run
    python bench/serve_http.py --quick                 # tiny model on the CPU: a smoke run

For each concurrency C (--clients, default 1,8,32), --requests-per-client x C requests of --prompt-len
random prompt tokens and --new-tokens greedy tokens (eos ignored) run closed-loop: C clients, each sending
its next request when the last one ended.
- offline: the same `LLM` in this process, C requests in flight through `add_request` / `step`;
- http: a live `moestack serve` process on 127.0.0.1 with the same engine settings, C asyncio clients
  streaming `POST /v1/completions` (token-id prompts, SSE) through httpx.
Per row: requests/s, output tok/s, time to first token and end-to-end latency p50/p99 (the HTTP ones as the
client sees them), and http/offline ratios. Each side is warmed up first with one request per client at every C
(kernel compiles, CUDA graph captures). JSON lines in $OUT/serve_http.jsonl or bench/results/serve_http.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, write_results  # noqa: E402
from serve import free, hf_model  # noqa: E402

from moestack.serve import LLM, SamplingParams  # noqa: E402
from moestack.serve.launch import ServerProcess  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(side: str, clients: int, wall: float, ttft: list[float], e2e: list[float], tokens: int) -> dict:
    return {"side": side, "clients": clients, "requests": len(e2e), "wall_s": wall, "req_s": len(e2e) / wall,
            "out_tok_s": tokens / wall, "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "e2e_p50_ms": 1e3 * pct(e2e, 50), "e2e_p99_ms": 1e3 * pct(e2e, 99)}


def save_model(folder: Path, name: str, layers: int, device: str) -> None:
    """A Hugging Face folder: the config's per-layer shapes with random weights, and a word-level tokenizer
    over the vocabulary (token "t<i>" is id i) so that every id decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = hf_model(name, layers, device, torch.bfloat16 if device == "cuda" else torch.float32)
    hf.config.eos_token_id = hf.config.pad_token_id = None
    hf.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(hf.config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    del hf


def offline(llm: LLM, prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """Closed loop in the engine: `clients` requests in flight, the next admitted as one finishes."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    todo, start, first, ttft, e2e, tokens = list(prompts), {}, {}, [], [], 0
    t0 = time.perf_counter()
    while todo or llm.has_unfinished():
        while todo and len(start) < clients:
            start[llm.add_request(todo.pop(), params)] = time.perf_counter()
        for out in llm.step():
            now, rid = time.perf_counter(), out.request_id
            tokens += len(out.new_token_ids)
            if out.new_token_ids and rid not in first:
                first[rid] = now
                ttft.append(now - start[rid])
            if out.finished:
                e2e.append(now - start.pop(rid))
    return summary("offline", clients, time.perf_counter() - t0, ttft, e2e, tokens)


async def http(url: str, model: str, prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """Closed loop over HTTP: `clients` asyncio clients, each streaming its requests one after another."""
    import httpx

    todo, ttft, e2e, tokens = list(prompts), [], [], 0

    async def client(session):
        nonlocal tokens
        while todo:
            body = {"model": model, "prompt": todo.pop(), "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0, got_first = time.perf_counter(), False
            async with session.stream("POST", url + "/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
                    elif not got_first and chunk["choices"] and chunk["choices"][0]["text"]:
                        got_first = True
                        ttft.append(time.perf_counter() - t0)
            e2e.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summary("http", clients, wall, ttft, e2e, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Hugging Face MoE folder or a moestack run (default: built here)")
    ap.add_argument("--shape", default="olmoe", help="config whose shapes the built model has (bench/serve.py CONFIGS)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, short requests: a CPU smoke run")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.layers, args.prompt_len, args.new_tokens, args.requests_per_client = "tiny", 2, 24, 8, 2
    levels = [int(c) for c in args.clients.split(",")]
    top = max(levels)
    blocks = top * -(-(args.prompt_len + args.new_tokens) // 16) + 32
    engine = dict(max_num_seqs=top, num_blocks=blocks, max_model_len=args.max_model_len)
    cli = ["--device", args.device, "--max-num-seqs", str(top), "--num-blocks", str(blocks), "--max-model-len",
           str(args.max_model_len), "--max-queue", str(4 * top)]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.shape)
            save_model(Path(model), args.shape, args.layers, args.device)
        llm = LLM(model, device=args.device, **engine)
        vocab = llm.model.spec.vocab_size
        gen = torch.Generator().manual_seed(0)

        def workload(clients: int) -> list[list[int]]:
            n = clients * args.requests_per_client
            return torch.randint(2, vocab, (n, args.prompt_len), generator=gen).tolist()

        loads = {c: workload(c) for c in levels}
        warm = {c: workload(c)[:c] for c in levels}  # one request per client at each level: compiles and graphs
        rows = []
        for c in levels:
            offline(llm, warm[c], c, args.new_tokens)
        for c in levels:
            llm.blocks.reset_prefix_cache()
            rows.append(offline(llm, loads[c], c, args.new_tokens))
        name = f"{llm.served.kind} ({Path(model).name}, {args.layers if args.model is None else 'all'} layers)"
        free(llm)
        del llm

        with ServerProcess(model, *cli, "--served-model-name", "bench") as srv:
            for c in levels:
                asyncio.run(http(srv.base_url, "bench", warm[c], c, args.new_tokens))
            for c in levels:
                rows.append(asyncio.run(http(srv.base_url, "bench", loads[c], c, args.new_tokens)))
            health = srv.health()
        assert health["kv_blocks_free"] == health["kv_blocks_total"], f"KV blocks held after the run: {health}"

    base = {r["clients"]: r for r in rows if r["side"] == "offline"}
    for r in rows:
        b = base[r["clients"]]
        r.update(bench="serve_http", model=str(name), device=device_name(args.device), layers=args.layers,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 req_s_vs_offline=r["req_s"] / b["req_s"], ttft_p50_vs_offline=r["ttft_p50_ms"] / b["ttft_p50_ms"])
    print(f"{rows[0]['model']} on {rows[0]['device']}: {args.prompt_len}-token prompts, {args.new_tokens} new tokens")
    print_table(rows, ["side", "clients", "requests", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
                       "e2e_p99_ms", "req_s_vs_offline"])
    print("results:", write_results("serve_http", rows))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
