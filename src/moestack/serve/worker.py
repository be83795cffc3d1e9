"""The one thread that owns the engine while the HTTP server runs.

Handlers never touch the engine (nor its tokenizer): they put a `Job` in the inbox and read what the
engine thread sends to the job's asyncio queue. The thread drains the inbox (new jobs: encode, check,
queue or refuse; aborts), runs `LLM.step` while there is work (continuous batching across every HTTP
request), publishes a `Snapshot` of the engine's state, and hands each step's outputs to the event loop
in one call. A failing step fails the requests in flight with a 500 and the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from moestack.serve.engine import LLM
from moestack.serve.metrics import Metrics
from moestack.serve.params import RequestOutput
from moestack.serve.protocol import ApiError

log = logging.getLogger("moestack")


@dataclass
class Job:
    """One HTTP request: its prompts (strings or token ids, or one chat's messages), `n` choices each.

    `sampling(choice, prompt_len, max_model_len)` gives each choice's SamplingParams (or raises ApiError).
    The engine thread puts on `outputs`: ("accepted", [prompt tokens per prompt]) or ("error", ApiError),
    then ("out", choice index, RequestOutput, logprobs) for each delta (only the final ones unless `stream`),
    logprobs being the new tokens' (all the tokens' when not streaming) as `EngineWorker._named` gives them,
    or None."""

    id: str
    prompts: list
    n: int
    sampling: object
    chat: bool
    stream: bool
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def num_choices(self) -> int:
        return (1 if self.chat else len(self.prompts)) * self.n


@dataclass(frozen=True)
class Snapshot:
    """The engine's state after the engine thread's last step (read by /health and /metrics)."""

    running: int = 0
    waiting: int = 0
    kv_free: int = 0
    kv_total: int = 0
    kv_usage: float = 0.0
    kv_cached: int | None = None  # evictable prefix-cache blocks among the free ones (counted when idle)
    max_batch: int = 0
    preemptions: int = 0
    finished: int = 0
    realb_layers: int = 0
    realb_low_layers: int = 0

    def as_dict(self) -> dict:
        return {"requests_running": self.running, "requests_waiting": self.waiting, "kv_blocks_free": self.kv_free,
                "kv_blocks_total": self.kv_total, "kv_blocks_cached": self.kv_cached, "max_batch": self.max_batch,
                "requests_finished": self.finished}


@dataclass
class _Choice:
    job: Job
    index: int
    last: float | None = None  # when its last token came


class EngineWorker:
    """Runs `llm` in its own thread; `submit` and `abort` are safe to call from any thread."""

    def __init__(self, llm: LLM, max_queue: int):
        self.llm, self.max_queue = llm, max_queue
        self.snapshot = Snapshot()
        self.metrics = Metrics(lambda: self.snapshot)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.choices: dict[str, _Choice] = {}  # engine request id -> its job and choice (engine thread only)
        self.thread = threading.Thread(target=self._run, name="moestack-engine", daemon=True)
        self._ids = itertools.count()
        self._out: list = []  # (job, message) to hand to the event loop after this iteration

    # -- any thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._publish_snapshot()
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def abort(self, job: Job) -> None:
        """Stop every choice of `job` still running and free its KV blocks."""
        self.inbox.put(("abort", job))

    def stop(self, timeout: float = 30) -> None:
        self.inbox.put(("stop", None))
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._iterate():
                    return
            except Exception as err:  # a bug in here must not stop the engine thread
                log.exception("engine thread error; failing the requests in flight")
                self._fail_all(err)
                self._flush()

    def _iterate(self) -> bool:
        """One pass: the inbox, then one engine step if there is work; True when told to stop."""
        llm = self.llm
        item = self._wait() if not llm.has_unfinished() else self._get_nowait()
        stopping = False
        while item is not None:
            stopping |= self._handle(*item)
            item = self._get_nowait()
        if stopping:
            self._abort_all()
            self._flush()
            return True
        if llm.has_unfinished():
            steps = llm.stats.steps
            try:
                outs = llm.step()
            except Exception as err:  # a failing step fails what is in flight; the engine keeps serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(err)
                outs = []
            if llm.stats.steps > steps:
                self.metrics.batch.observe(llm.stats.last_batch)
            self._outputs(outs)
        self._publish_snapshot()  # before the outputs go out: a client that got its answer sees its blocks free
        self._flush()
        return False

    def _wait(self):
        """The next inbox item, however long it takes; an engine with `tick_in` (rank 0 under torchrun,
        serve/ep_server.py) gets `tick()` called whenever its next idle broadcast is due meanwhile."""
        tick_in = getattr(self.llm, "tick_in", None)
        while True:
            try:
                return self.inbox.get(timeout=None if tick_in is None else tick_in())
            except queue.Empty:
                self.llm.tick()

    def _get_nowait(self):
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, op: str, job: Job | None) -> bool:
        if op == "submit":
            try:
                self._admit(job)
            except ApiError as err:
                self.metrics.rejected.labels(str(err.status)).inc()
                self._out.append((job, ("error", err)))
        elif op == "abort":
            for rid in [r for r, c in self.choices.items() if c.job is job]:
                self.llm.abort(rid)
                del self.choices[rid]
                self.metrics.finished.labels("abort").inc()
        return op == "stop"

    def _admit(self, job: Job) -> None:
        """Encode and check every prompt of the job, then queue all its choices, or none (ApiError)."""
        llm, param = self.llm, "messages" if job.chat else "prompt"
        try:
            ids = [llm.tokenizer.chat_prompt(job.prompts)] if job.chat else [llm.encode_prompt(p)[0] for p in job.prompts]
            for x in ids:
                llm.check_prompt(x, None)
        except Exception as err:  # ValueError from the engine's checks; a chat template's own errors
            raise ApiError(400, f"{param}: {err}", param) from None
        try:
            params = [[job.sampling(i, len(x), llm.max_model_len) for i in range(job.n)] for x in ids]
        except ValueError as err:  # SamplingParams' own checks
            raise ApiError(400, str(err)) from None
        asked = len(ids) * job.n
        if llm.num_waiting + asked > self.max_queue:
            raise ApiError(429, f"the server has {llm.num_waiting} requests waiting (--max-queue {self.max_queue}) "
                                f"and this one adds {asked}; retry later", None, "queue_full")
        for p, (x, plist) in enumerate(zip(ids, params)):
            for i, sp in enumerate(plist):
                rid = f"{job.id}-{next(self._ids)}"
                llm.add_request(x, sp, request_id=rid)
                self.choices[rid] = _Choice(job, p * job.n + i)
        self.metrics.prompt_tokens.inc(sum(map(len, ids)) * job.n)
        self._out.append((job, ("accepted", [len(x) for x in ids])))

    def _outputs(self, outs: list[RequestOutput]) -> None:
        m, now = self.metrics, time.perf_counter()
        for out in outs:
            choice = self.choices.get(out.request_id)
            if choice is None:
                continue
            if out.new_token_ids:
                m.generation_tokens.inc(len(out.new_token_ids))
                if choice.last is None:
                    m.ttft.observe(now - choice.job.arrival)
                else:
                    for _ in out.new_token_ids:
                        m.itl.observe((now - choice.last) / len(out.new_token_ids))
                choice.last = now
            if out.finished:
                del self.choices[out.request_id]
                m.finished.labels(out.finish_reason or "length").inc()
                m.e2e.observe(now - choice.job.arrival)
            if out.finished or choice.job.stream:
                lps = out.new_logprobs if choice.job.stream else (out.completion.logprobs if out.completion else None)
                self._out.append((choice.job, ("out", choice.index, out, self._named(lps))))

    def _named(self, logprobs) -> list[dict] | None:
        """TokenLogprobs with their tokens' text (the engine thread owns the tokenizer): dicts of token,
        logprob, bytes (UTF-8) and top (a list of the same without top)."""
        if logprobs is None:
            return None
        decode = self.llm.tokenizer.decode

        def entry(tid: int, lp: float) -> dict:
            text = decode([tid])
            return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode("utf-8"))}

        return [{**entry(t.token_id, t.logprob), "top": [entry(i, v) for i, v in t.top]} for t in logprobs]

    def _fail_all(self, err: Exception) -> None:
        error = ApiError(500, f"the engine failed on a step ({type(err).__name__}: {err}); the request was aborted",
                         None, "engine_error")
        failed = {c.job.id: c.job for c in self.choices.values()}
        self._abort_all()
        self._out += [(job, ("error", error)) for job in failed.values()]

    def _abort_all(self) -> None:
        for rid in list(self.choices):
            self.llm.abort(rid)
            self.metrics.finished.labels("abort").inc()
        self.choices.clear()

    def _publish_snapshot(self) -> None:
        llm, b = self.llm, self.llm.blocks
        idle = not llm.has_unfinished()
        self.snapshot = Snapshot(llm.num_running, llm.num_waiting, b.num_free, b.num_blocks, b.usage(),
                                 b.num_cached_free if idle else None, llm.stats.max_batch,
                                 llm.scheduler.num_preemptions, llm.stats.finished, llm.stats.realb_layers,
                                 llm.stats.realb_low_layers)

    def _flush(self) -> None:
        """Hand this iteration's messages to the event loop in one call."""
        if not self._out:
            return
        out, self._out = self._out, []
        loop = out[0][0].loop
        try:
            loop.call_soon_threadsafe(_deliver, out)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass


def _deliver(messages: list) -> None:
    for job, msg in messages:
        job.outputs.put_nowait(msg)
