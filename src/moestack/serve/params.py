"""What a request asks for (`SamplingParams`) and what it gets back (`Completion`, `RequestOutput`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20  # the OpenAI API's limit on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: times the number of times the token was generated
    logprobs: int | None = None  # None: none; N >= 0: each token's log-probability and the N most likely

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise ValueError(f"SamplingParams.{name} must be a number in [-2, 2], got {value!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                             f"got {self.logprobs!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        """SamplingParams from a mapping; an unknown field is a ValueError naming it and the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {', '.join(unknown)}; SamplingParams takes {', '.join(sorted(known))}")
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Completion:
    """One finished request: the generated text and token ids, and why it stopped ("stop" or "length")."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list["TokenLogprob"] | None = None  # one per token of token_ids when SamplingParams.logprobs is set


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, penalties and filters, as
    vLLM reports it) and the `top` most likely tokens with theirs (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one engine step produced for one request: its new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    completion: Completion | None = None  # set when finished
    new_logprobs: list[TokenLogprob] | None = None  # for new_token_ids, when the request asked for logprobs
    extra: dict = field(default_factory=dict)
