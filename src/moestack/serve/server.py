"""`moestack serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine.

Routes: POST /v1/completions and /v1/chat/completions (streamed as SSE `data:` lines ending with
`data: [DONE]`, or whole), GET /v1/models, /health, /metrics (Prometheus). The engine runs in its own
thread (serve/worker.py) with continuous batching across every request; handlers only parse, hand a
`Job` over and format what comes back. Bad requests get a 4xx with an OpenAI error body, never a dead
engine; a client that goes away has its requests aborted (their KV blocks freed); a full queue answers
429; the first SIGTERM refuses new requests with 503, lets running ones finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moestack.serve.engine import LLM
from moestack.serve.protocol import ApiError, ChatRequest, CompletionRequest
from moestack.serve.worker import EngineWorker, Job

log = logging.getLogger("moestack")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """The chat API's logprobs object for the tokens `entries` (EngineWorker._named)."""
    if entries is None:
        return None
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": [{k: t[k] for k in ("token", "logprob", "bytes")} for t in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """The completions API's (legacy) logprobs object; text offsets count from `offset` characters."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries], "text_offset": offsets}


class Api:
    """The routes' logic, on one engine worker (kept apart from FastAPI's wiring in `create_app`)."""

    def __init__(self, llm: LLM, model_name: str, max_queue: int):
        self.llm, self.model_name = llm, model_name
        self.worker = EngineWorker(llm, max_queue)
        self.active: set[str] = set()  # jobs not yet answered in full (what a drain waits for)
        self.draining = False
        self.created = int(time.time())

    async def parse(self, request: Request, model):
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = model.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            if first["type"] == "extra_forbidden":
                raise ApiError(400, f"unknown field {param!r}: leave it out (this server takes the OpenAI API's "
                                    "fields, plus top_k and ignore_eos)", param, "unknown_field") from None
            raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None
        if req.model not in (None, self.model_name):
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        req.check()
        return req

    async def handle(self, request: Request, model, chat: bool):
        try:
            req = await self.parse(request, model)
            prompts = req.chat() if chat else req.prompts()
        except ApiError as err:
            self.worker.metrics.rejected.labels(str(err.status)).inc()
            return error_response(err)
        prefix = "chatcmpl" if chat else "cmpl"
        job = Job(f"{prefix}-{uuid.uuid4().hex[:24]}", prompts, req.n, req.sampling, chat, req.stream,
                  asyncio.get_running_loop())
        self.active.add(job.id)
        try:
            self.worker.submit(job)
            kind, value = await job.outputs.get()
            if kind == "error":
                self.active.discard(job.id)
                return error_response(value)
            prompt_tokens = sum(value) * req.n
        except BaseException:
            self.worker.abort(job)
            self.active.discard(job.id)
            raise
        if not req.stream:
            return await self.whole(job, req, prompt_tokens, chat)
        return StreamingResponse(self.stream(job, req, prompt_tokens, chat), media_type="text/event-stream")

    def _done(self, job: Job) -> None:
        self.active.discard(job.id)

    async def whole(self, job: Job, req, prompt_tokens: int, chat: bool) -> JSONResponse:
        total = job.num_choices
        done: dict[int, object] = {}
        lps: dict[int, list | None] = {}
        try:
            while len(done) < total:
                kind, *rest = await job.outputs.get()
                if kind == "error":
                    return error_response(rest[0])
                index, out, lps[index] = rest
                done[index] = out.completion
        except BaseException:
            self.worker.abort(job)
            raise
        finally:
            self._done(job)
        choices = []
        for i in range(total):
            c = done[i]
            if chat:
                body = {"message": {"role": "assistant", "content": c.text}, "logprobs": chat_logprobs(lps[i])}
            else:
                body = {"text": c.text, "logprobs": completion_logprobs(lps[i])}
            choices.append({"index": i, **body, "finish_reason": c.finish_reason})
        completion = sum(len(c.token_ids) for c in done.values())
        return JSONResponse({"id": job.id, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                       "total_tokens": prompt_tokens + completion}})

    async def stream(self, job: Job, req, prompt_tokens: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": job.id, "object": kind, "created": int(time.time()), "model": self.model_name}
        total = job.num_choices
        pending, completion = set(range(total)), 0
        offsets = [0] * total  # characters of logprob tokens sent per choice (completions' text_offset)

        def chunk(i: int, text: str, reason: str | None, first: bool = False, lps: list | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": chat_logprobs(lps), "finish_reason": reason}
            else:
                choice = {"index": i, "text": text, "logprobs": completion_logprobs(lps, offsets[i]),
                          "finish_reason": reason}
                offsets[i] += sum(len(e["token"]) for e in lps or ())
            return _sse({**head, "choices": [choice]})

        try:
            if chat:
                for i in range(total):
                    yield chunk(i, "", None, first=True)
            while pending:
                msg, *rest = await job.outputs.get()
                if msg == "error":
                    yield _sse(rest[0].body())
                    break
                index, out, lps = rest
                completion += len(out.new_token_ids)
                if out.new_text or out.finished or lps:
                    yield chunk(index, out.new_text, out.finish_reason if out.finished else None, lps=lps)
                if out.finished:
                    pending.discard(index)
            if req.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield _sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: nothing of this job keeps running
            if pending:
                self.worker.abort(job)
            self._done(job)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "moestack", "max_model_len": self.llm.max_model_len}]}

    def health(self) -> dict:
        status = "ok" if self.worker.alive else "engine_dead"
        return {"status": "draining" if self.draining else status, "requests_active": len(self.active),
                **self.worker.snapshot.as_dict()}


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving `llm` (its engine thread starts and stops with the app)."""
    api = Api(llm, model_name, max_queue)

    async def lifespan(app):
        api.worker.start()
        yield
        api.worker.stop()

    app = FastAPI(title="moestack", lifespan=lifespan)
    app.state.api = api

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(ApiError(401, "missing or wrong API key: send the header "
                                                    "'Authorization: Bearer KEY' with the server's --api-key",
                                               code="invalid_api_key"))
            if api.draining and request.method == "POST":
                return error_response(ApiError(503, "the server is shutting down; retry on another server",
                                               code="shutting_down"))
        return await call_next(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.handle(request, ChatRequest, chat=True)

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.get("/health")
    async def health():
        body = api.health()
        return JSONResponse(body, status_code=200 if body["status"] != "engine_dead" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(api.worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains: new requests get 503 while the ones in flight
    finish, then it shuts down and the process exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, api: Api):
        super().__init__(config)
        self.api = api

    def handle_exit(self, sig, frame) -> None:
        # uvicorn re-raises the signals it captured once it has shut down (the process would then die of
        # SIGTERM); a drained server has done what the signal asked and exits 0, so none is recorded.
        if self.api.draining:
            self.force_exit = self.should_exit = True
            return
        self.api.draining = True
        log.warning("draining: %d requests in flight, refusing new ones", len(self.api.active))

        def wait_then_exit():
            while self.api.active:
                time.sleep(0.02)
            self.should_exit = True

        threading.Thread(target=wait_then_exit, name="moestack-drain", daemon=True).start()


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256) -> None:
    """Serve `llm` until SIGTERM/SIGINT (blocking)."""
    app = create_app(llm, model_name, api_key, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    log.warning("serving %s on http://%s:%d/v1 (OpenAI API)", model_name, host, port)
    DrainingServer(config, app.state.api).run()
