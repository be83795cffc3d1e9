"""A request inside the engine: its tokens, how many have KV in the cache, its blocks and its state."""

from __future__ import annotations

from enum import Enum

from moestack.serve.params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens. `num_computed` tokens have their KV in `block_table`'s blocks."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                 arrival: int = 0):
        self.request_id, self.prompt, self.params, self.arrival = request_id, prompt, params, arrival
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.num_computed = 0  # tokens whose KV is written
        self.num_cached = 0  # prompt tokens found in the prefix cache at the last admission
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text = ""  # detokenized output so far (up to a stop string)
        self.detok = (self.num_prompt, self.num_prompt)  # (prefix, read) into token_ids: the detokenizer's window
        self.sent_text = 0  # characters of `text` already handed out as deltas
        self.sent_tokens = 0  # output tokens already handed out
        self.num_preempted = 0
        self.logprobs: list | None = [] if params.logprobs is not None else None  # TokenLogprob per output token

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    def num_blocks_for(self, num_tokens: int, block_size: int) -> int:
        return -(-num_tokens // block_size)

    def block_tokens(self, i: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[i * block_size:(i + 1) * block_size])

    def append(self, token: int) -> None:
        self.token_ids.append(token)
