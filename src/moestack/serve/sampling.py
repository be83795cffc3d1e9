"""Next-token sampling for a batch of sequences, each with its own SamplingParams.

Rows with presence / frequency penalties first have them subtracted (OpenAI's rule: logit - frequency x
count - presence x [count > 0], counts over the tokens generated so far). Greedy rows take the argmax.
Other rows are divided by their temperature, filtered by top-k and top-p (nucleus) and drawn from the
softmax; a request with a seed draws from its own generator, so its tokens do not depend on what else
shares the batch. Rows that asked for logprobs get them from the raw logits (before penalties, temperature
and filters, as vLLM reports them): the chosen token's and the top N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moestack.serve.params import SamplingParams


class Logprobs(NamedTuple):
    """For the rows that asked: row indices [R], the chosen tokens' logprobs [R], top values and ids [R, K]."""

    rows: list[int]
    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


def penalize(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """logits [N, V] with each penalized row's presence / frequency penalties applied (a new tensor)."""
    rows = [i for i, p in enumerate(params) if p.penalized and outputs[i]]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[-1]
    counts = torch.zeros(len(rows), V, device=dev, dtype=logits.dtype)
    for j, i in enumerate(rows):
        ids = torch.tensor(outputs[i], device=dev)
        counts[j].index_add_(0, ids, torch.ones(len(ids), device=dev, dtype=logits.dtype))
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev, dtype=logits.dtype).unsqueeze(1)
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev, dtype=logits.dtype).unsqueeze(1)
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx) - freq * counts - pres * (counts > 0).to(logits.dtype)
    return logits.index_copy(0, idx, sub)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> Logprobs | None:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    idx = torch.tensor(rows, device=logits.device)
    lp = logits.index_select(0, idx).float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1)
    k = max(params[i].logprobs for i in rows)
    top = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return Logprobs(rows, chosen, top[0], top[1])


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           outputs: list[list[int]] | None = None,
           greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, Logprobs | None]:
    """Token ids [N] (device) for logits [N, V] of N sequences whose generated tokens are `outputs` (needed
    only for penalties), and the logprobs the rows asked for. greedy: the argmax of each row, when the step
    already took it (the decode graphs do); a batch of greedy rows without penalties or logprobs then reads
    nothing else. Logits of another dtype than fp32 are copied to fp32 first otherwise."""
    if greedy is not None and outputs is None and all(p.greedy and p.logprobs is None for p in params):
        return greedy, None
    raw = logits = logits.float()
    if outputs is not None:
        logits = penalize(logits, params, outputs)
    tokens = _draw(logits, params, generators)
    return tokens, logprobs_of(raw, tokens, params)


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, idx)
    temp = torch.tensor([params[i].temperature for i in rows], device=logits.device).unsqueeze(1)
    sub = filter_top_k_top_p(sub / temp, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
    probs = sub.softmax(dim=-1)
    drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    plain = [j for j, i in enumerate(rows) if generators[i] is None]
    if plain:
        pj = torch.tensor(plain, device=logits.device)
        drawn[pj] = torch.multinomial(probs.index_select(0, pj), 1).squeeze(1)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            drawn[j] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out.index_copy(0, idx, drawn)


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf what top-k (0 = off) and top-p (1 = off) exclude, per row of logits [N, V]."""
    V = logits.shape[-1]
    if any(0 < k < V for k in top_k):
        k = torch.tensor([k if 0 < k < V else V for k in top_k], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p < 1 for p in top_p):
        p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        drop_sorted = before >= p  # keep the smallest prefix reaching p (the top token always stays)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
