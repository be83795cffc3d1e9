"""`moestack serve` as a live process on 127.0.0.1, driven by the official `openai` client (and raw httpx
for what a client library would not send): same greedy text as the offline engine, 32 concurrent streams,
every bad input answered with a 4xx and an error body while the server keeps serving, API keys, a queue
limit, a client that leaves mid-stream, and a SIGTERM that drains."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moestack.serve import LLM, SamplingParams  # noqa: E402
from moestack.serve.launch import ServerProcess  # noqa: E402
from tests.serve.helpers import hf_folder  # noqa: E402

KEY = "sk-test-moestack"
MAX_LEN = 256
LONG_LEN = 4096  # a stream long enough (seconds on CPU) that a client can leave it mid-way
ARGS = ("--device", "cpu", "--max-model-len", str(MAX_LEN), "--max-num-seqs", "16", "--num-blocks", "160")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe_srv")
    hf_folder(path, "olmoe", max_position_embeddings=LONG_LEN)  # servers here cap it with --max-model-len
    return str(path)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, device="cpu", max_model_len=MAX_LEN, num_blocks=160, max_num_seqs=16)


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(model_dir, *ARGS, "--api-key", KEY, "--served-model-name", "tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def post(server, route: str, body=None, *, content: str | None = None, key: str | None = KEY):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
        return httpx.post(server.base_url + route, content=content, headers=headers, timeout=60)
    return httpx.post(server.base_url + route, json=body, headers=headers, timeout=60)


def metric(server, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when the series has no sample yet)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_idle(server, timeout: float = 30) -> dict:
    """/health once nothing runs or waits, with every KV block back in the free pool."""
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if h["requests_running"] == 0 and h["requests_waiting"] == 0 and h["requests_active"] == 0 \
                and h["kv_blocks_free"] == h["kv_blocks_total"]:
            return h
        assert time.monotonic() < deadline, f"server not idle: {h}"
        time.sleep(0.05)


def still_serves(client) -> None:
    out = client.completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 2


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


PROMPTS = ["def f(x):", "the cat sat on", "a", "import numpy as np\n" * 3]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = server.health()
    assert h["status"] == "ok" and h["kv_blocks_total"] == 160


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_the_offline_engine(server, client, offline, stream):
    ref = offline.generate(PROMPTS, greedy(24, ignore_eos=True), use_tqdm=False)
    for prompt, want in zip(PROMPTS, ref):
        kw = dict(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            out = client.completions.create(**kw)
            text, reasons, usage = out.choices[0].text, [out.choices[0].finish_reason], out.usage
        assert text == want.text
        assert reasons == ["length"]
        assert usage.prompt_tokens == len(offline.encode_prompt(prompt)[0]) and usage.completion_tokens == 24


def test_completion_default_stops_at_eos_like_the_engine(client, offline):
    """Without ignore_eos both stop where the model emits its eos (or run to max_tokens)."""
    prompts = [f"{i} times {i} is" for i in range(6)]
    ref = offline.generate(prompts, greedy(40), use_tqdm=False)
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=40, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in ref]
    assert [c.finish_reason for c in sorted(out.choices, key=lambda c: c.index)] == [r.finish_reason for r in ref]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_the_offline_engine(client, offline, stream):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    ids = offline.tokenizer.chat_prompt(messages)
    want = offline.generate([ids], greedy(20, ignore_eos=True), use_tqdm=False)[0]
    kw = dict(model="tiny", messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        out = client.chat.completions.create(**kw)
        text = out.choices[0].message.content
        assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)
    assert text == want.text


def test_n_seed_and_stop(client, offline):
    """n choices sample with seeds seed, seed+1, ... (what the offline engine gives); a stop string ends a
    choice with finish_reason "stop" and is not part of the text."""
    kw = dict(model="tiny", prompt="once upon a time", max_tokens=16, temperature=1.0, top_p=0.9, seed=7, n=3,
              extra_body={"ignore_eos": True})
    out = client.completions.create(**kw)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    ref = [offline.generate(["once upon a time"], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7 + i,
                                                                 ignore_eos=True), use_tqdm=False)[0].text
           for i in range(3)]
    assert texts == ref and len(set(texts)) > 1
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in out.choices]
    full = offline.generate(["def f(x):"], greedy(24, ignore_eos=True), use_tqdm=False)[0].text
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    want = offline.generate(["def f(x):"], greedy(24, ignore_eos=True, stop=(stop,)), use_tqdm=False)[0]
    assert cut.choices[0].finish_reason == "stop" == want.finish_reason
    assert cut.choices[0].text == want.text == full[:full.index(stop)]


def test_32_concurrent_streams(server, offline):
    """32 clients stream at once, prompts of 1-120 tokens, 4-40 new tokens: each gets the offline engine's
    text, the engine batched them, /metrics counted them all, and no KV block is left held."""
    wait_idle(server)
    prompts = [("abcdefghij klmnop qrstu vwxyz 0123456789. " * 3)[: 1 + (i * 37) % 120] for i in range(32)]
    lengths = [4 + (i * 7) % 37 for i in range(32)]
    ref = [offline.generate([p], greedy(n, ignore_eos=True), use_tqdm=False)[0].text for p, n in zip(prompts, lengths)]
    before = {k: metric(server, f"moestack:{k}") for k in ("generation_tokens_total", "prompt_tokens_total")}
    ok_before = metric(server, "moestack:request_success_total", finished_reason="length")
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)
    start = threading.Barrier(32)

    finished = {}

    def one(i):
        start.wait()
        time.sleep(0.002 * i)  # arrive in index order
        chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finished[i] = time.perf_counter()
        return text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == ref
    order = sorted(finished, key=finished.get)
    assert order != sorted(order)  # lengths differ, so requests finish out of arrival order
    assert order.index(lengths.index(min(lengths))) < order.index(lengths.index(max(lengths)))
    h = wait_idle(server)
    assert h["max_batch"] > 1
    assert metric(server, "moestack:request_success_total", finished_reason="length") - ok_before == 32
    assert metric(server, "moestack:generation_tokens_total") - before["generation_tokens_total"] == sum(lengths)
    prompt_tokens = sum(len(offline.encode_prompt(p)[0]) for p in prompts)
    assert metric(server, "moestack:prompt_tokens_total") - before["prompt_tokens_total"] == prompt_tokens
    assert metric(server, "moestack:time_to_first_token_seconds_count") >= 32
    assert metric(server, "moestack:kv_blocks_free") == metric(server, "moestack:kv_blocks_total") == 160


BAD = [  # (route, body or raw text, status, param/code fragment in the error)
    ("/completions", "{not json", 400, "not valid JSON"),
    ("/completions", "[1, 2]", 400, "JSON object"),
    ("/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/completions", {"prompt": 5}, 400, "prompt"),
    ("/completions", {}, 400, "prompt"),
    ("/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias is not supported"),
    ("/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs"),
    ("/completions", {"prompt": "x", "echo": True}, 400, "echo is not supported"),
    ("/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/completions", {"prompt": "x", "max_tokens": MAX_LEN}, 400, "context_length_exceeded"),
    ("/completions", {"prompt": "y" * (MAX_LEN + 5), "max_tokens": 1}, 400, "context"),
    ("/completions", {"prompt": ""}, 400, "empty"),
    ("/completions", {"prompt": [2, 3, 999]}, 400, "vocabulary"),
    ("/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/chat/completions", {"messages": []}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools is not supported"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, 400,
     "context_length_exceeded"),
    ("/nowhere", {"prompt": "x"}, 404, "Not Found"),
]


@pytest.mark.parametrize("route, body, status, fragment", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_an_error_body_and_the_server_keeps_serving(server, client, route, body, status,
                                                                           fragment):
    r = post(server, route, content=body) if isinstance(body, str) else post(server, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert fragment in " ".join(str(v) for v in err.values())
    still_serves(client)
    assert server.health()["status"] == "ok"


def test_the_openai_client_sees_4xx_as_its_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="max_model_len") as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=MAX_LEN)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    still_serves(client)


def test_fields_outside_the_api_are_ignored_with_a_warning(server, client):
    """As vLLM does (SERVING.md): a field the OpenAI API does not have changes nothing and is logged once."""
    kw = dict(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw, extra_body={"beam_width": 2}).choices[0].text == plain
    _wait_for(lambda: "ignoring request fields outside the OpenAI API: beam_width" in server.log())


def test_penalties_and_logprobs_match_the_offline_engine(client, offline):
    kw = dict(max_tokens=12, temperature=0, presence_penalty=0.5, frequency_penalty=1.0)
    want = offline.generate(["abcabc"], greedy(12, ignore_eos=True, logprobs=2, presence_penalty=0.5,
                                                frequency_penalty=1.0), use_tqdm=False)[0]
    out = client.completions.create(model="tiny", prompt="abcabc", logprobs=2, extra_body={"ignore_eos": True}, **kw)
    c = out.choices[0]
    assert c.text == want.text
    assert c.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    assert c.logprobs.tokens == [offline.tokenizer.decode([t]) for t in want.token_ids]
    assert [len(t) for t in c.logprobs.top_logprobs] == [2] * 12 and c.logprobs.text_offset[0] == 0
    chunks = list(client.completions.create(model="tiny", prompt="abcabc", logprobs=2, stream=True,
                                            extra_body={"ignore_eos": True}, **kw))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True}, **kw).choices[0]
    ids = offline.tokenizer.chat_prompt(messages)
    ref = offline.generate([ids], greedy(12, ignore_eos=True, logprobs=3, presence_penalty=0.5, frequency_penalty=1.0),
                           use_tqdm=False)[0]
    assert chat.message.content == ref.text
    assert [e.logprob for e in chat.logprobs.content] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
    for e, lp in zip(chat.logprobs.content, ref.logprobs):  # top: the raw model's (penalties come after)
        assert [t.token for t in e.top_logprobs] == [offline.tokenizer.decode([i]) for i, _ in lp.top]
        assert e.bytes == list(e.token.encode())


def test_api_key_is_enforced_on_every_v1_route(server):
    for key in (None, "sk-wrong"):
        for r in (post(server, "/completions", {"prompt": "x"}, key=key),
                  httpx.get(server.base_url + "/models", headers={"authorization": f"Bearer {key}"} if key else {})):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert post(server, "/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_a_client_that_leaves_mid_stream_is_aborted_and_its_blocks_freed(model_dir):
    """A server of its own with a long context: the 4k-token stream takes seconds on CPU, so the client surely
    leaves it mid-way (the module's server would finish a 236-token stream in about 0.2 s, a race)."""
    with ServerProcess(model_dir, "--device", "cpu", "--max-model-len", str(LONG_LEN), "--num-blocks", "300") as srv:
        body = {"prompt": "a long story: ", "max_tokens": LONG_LEN - 100, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert sum(x.startswith("data: ") for x in got) >= 3
            assert srv.health()["requests_running"] == 1
        h = wait_idle(srv)
        assert h["kv_blocks_free"] == h["kv_blocks_total"]
        assert metric(srv, "moestack:request_success_total", finished_reason="abort") == 1
        assert metric(srv, "moestack:request_success_total", finished_reason="length") == 0


def test_queue_limit_then_sigterm_drains_and_exits_0(model_dir, offline):
    """One running request, one waiting (the queue holds one): a third is a 429. Then SIGTERM: new requests
    get 503, both in flight finish with their full text, and the process exits 0."""
    n, name = MAX_LEN - 40, os.path.basename(model_dir)
    want = {p: offline.generate([f"{p}: "], greedy(n, ignore_eos=True), use_tqdm=False)[0].text for p in "ab"}
    with ServerProcess(model_dir, *ARGS[:-4], "--max-num-seqs", "1", "--max-queue", "1") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)
        results = {}

        def run(p):
            chunks = client.completions.create(prompt=f"{p}: ", model=name, max_tokens=n, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            results[p] = "".join(c.choices[0].text for c in chunks if c.choices)

        a = threading.Thread(target=run, args=("a",))
        a.start()
        _wait_for(lambda: srv.health()["requests_running"] == 1)
        b = threading.Thread(target=run, args=("b",))
        b.start()
        _wait_for(lambda: srv.health()["requests_waiting"] == 1)
        with pytest.raises(openai.RateLimitError, match="max-queue") as err:
            client.completions.create(model=name, prompt="c", max_tokens=2)
        assert err.value.code == "queue_full"
        assert srv.health()["requests_active"] == 2

        srv.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: srv.health()["status"] == "draining")
        r = httpx.post(srv.base_url + "/completions", json={"prompt": "late", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert srv.proc.wait(120) == 0, srv.log()
        a.join(30)
        b.join(30)
        assert results == want


def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette'):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_core_imports_without_the_serve_extra(model_dir):
    import subprocess
    import sys

    code = BLOCK + "import moestack.serve, moestack.cli, moestack.train\nprint('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    code = BLOCK + f"import sys; from moestack.cli import main; sys.exit(main(['serve', '--model', {model_dir!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "pip install 'moestack[serve]'" in done.stderr


def test_bench_serve_http_quick(tmp_path):
    """bench/serve_http.py end to end on the CPU: offline and HTTP rows for each client count."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "bench/serve_http.py", "--quick", "--clients", "1,4", "--device", "cpu"],
                          cwd=root, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "serve_http.jsonl").read_text().splitlines()]
    assert sorted((r["side"], r["clients"]) for r in rows) == [("http", 1), ("http", 4), ("offline", 1), ("offline", 4)]
    assert all(r["requests"] == 2 * r["clients"] and r["req_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
