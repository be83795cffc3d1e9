"""The OpenAI API's request bodies (pydantic) and the error body, read the way vLLM's server reads them.

Standard fields are typed (strictly: "1" is not a number). A standard field moestack does not support, set
to something other than its default, is a 400 naming it. Fields outside the OpenAI API are ignored with one
logged warning per request, as vLLM does (docs: SERVING.md), except vLLM's extensions that the engine has
(`top_k`, `ignore_eos`). Nothing here touches the engine: the engine thread encodes prompts (serve/worker.py).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from moestack.serve.params import MAX_LOGPROBS, SamplingParams

log = logging.getLogger("moestack")

ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", strict=True)
    UNSUPPORTED: ClassVar[dict] = {"logit_bias": (None, {})}

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: Any = None
    top_k: int = Field(default=0, ge=0)  # vLLM's extensions, outside the OpenAI API
    ignore_eos: bool = False

    def check(self) -> None:
        """ApiError for an unsupported field set to a value other than its default; a warning for fields outside
        the API."""
        for name, defaults in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value == d and type(value) is type(d) for d in defaults):
                raise ApiError(400, f"{name} is not supported by moestack; leave it out (or give its default "
                                    f"{defaults[0]!r})", name, "unsupported_parameter")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop_list):
            raise ApiError(400, "stop: give a non-empty string or a list of non-empty strings", "stop")
        _ = self.num_logprobs  # its own 400s (chat: top_logprobs without logprobs)
        ignored = sorted(self.model_extra or {})
        if ignored:
            log.warning("ignoring request fields outside the OpenAI API: %s", ", ".join(ignored))

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def default_tokens(self, room: int) -> int:
        return room

    def sampling(self, index: int, prompt_len: int, max_model_len: int) -> SamplingParams:
        """The engine's parameters for choice `index` of a prompt of `prompt_len` tokens (seeds differ per choice)."""
        room = max_model_len - prompt_len
        wanted = self.wanted_tokens
        if wanted is not None and wanted > room:
            raise ApiError(400, f"this model's context is {max_model_len} tokens (max_model_len); the prompt has "
                                f"{prompt_len} and max_tokens asks for {wanted} more: lower max_tokens to {room} "
                                "or shorten the prompt", "max_tokens", "context_length_exceeded")
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=wanted or self.default_tokens(room), temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, stop=tuple(self.stop_list), seed=seed,
                              ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logprobs=self.num_logprobs)

    @property
    def num_logprobs(self) -> int | None:
        """How many top logprobs per token the request wants (None: no logprobs)."""
        return None


class CompletionRequest(_Request):
    """POST /v1/completions."""

    UNSUPPORTED: ClassVar[dict] = {**_Request.UNSUPPORTED, "echo": (False,), "suffix": (None, ""), "best_of": (None, 1)}

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def default_tokens(self, room: int) -> int:
        return min(16, room)  # the OpenAI API's default for completions

    def prompts(self) -> list[str | list[int]]:
        """One prompt (a string or token ids) per entry of a batched `prompt`."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty; give a string, a list of token ids, or a list of those", "prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        """The message's text; content parts other than text are a 400 (moestack serves text models)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages.{i}.content.{j}: only text parts ({{'type': 'text', 'text': ...}}) "
                                    f"are supported, got type {part.get('type')!r}", f"messages.{i}.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    UNSUPPORTED: ClassVar[dict] = {**_Request.UNSUPPORTED,
                   "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
                   "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
                   "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
                   "web_search_options": (None,), "reasoning_effort": (None,), "verbosity": (None,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    # accepted, no effect on the output
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        """The messages as the tokenizer's chat template takes them."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
