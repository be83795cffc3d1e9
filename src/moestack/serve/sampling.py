"""Next-token sampling for a batch of sequences, each with its own SamplingParams.

Greedy rows take the argmax. Other rows are divided by their temperature, filtered by top-k and top-p
(nucleus) and drawn from the softmax; a request with a seed draws from its own generator, so its tokens
do not depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from moestack.serve.params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Token ids [N] (device) for logits [N, V] (fp32) of N sequences."""
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
