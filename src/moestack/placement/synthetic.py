"""Synthetic routing traces with skewed expert loads and inter-layer affinity (for benches and tests)."""

from __future__ import annotations

import numpy as np

from .trace import RoutingTrace, TraceRecorder


def synthetic_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_tokens: int = 8192,
    skew: float = 0.8,
    affinity: float = 0.7,
    group_size: int = 8,
    seed: int = 0,
) -> RoutingTrace:
    """Simulate token routing through ``num_layers`` MoE layers.

    Expert popularity per layer is Zipf-like: the r-th most popular expert has weight 1/(r+1)**skew
    (ranks shuffled per layer). Experts of each layer are split at random into groups of ``group_size``
    (min(group_size, E/2)); every token has a latent type, one group per layer, like a topic that the
    same experts specialise in. Each choice follows the token's group with probability ``affinity``
    and popularity otherwise, so an expert sends most of its tokens to the few experts of its group in
    the next layer. Every token picks ``top_k`` distinct experts per layer (Gumbel top-k).
    """
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    size = max(1, min(group_size, E // 2))
    num_groups = E // size
    popularity = _popularity(rng, L, E, skew)  # [L, E]
    token_group = rng.integers(num_groups, size=num_tokens)  # [T]
    recorder = TraceRecorder(L, E, k)
    for layer in range(L):
        in_group = _group_masks(rng, E, num_groups)  # [groups, E] bool
        grouped = popularity[layer] * in_group  # [groups, E]
        grouped /= grouped.sum(axis=1, keepdims=True)
        probs = (1 - affinity) * popularity[layer] + affinity * grouped[token_group]  # [T, E]
        recorder.record(layer, _sample(rng, probs, k))
    return recorder.trace()


def _popularity(rng: np.random.Generator, L: int, E: int, skew: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, E + 1) ** skew
    rows = np.stack([rng.permutation(weights) for _ in range(L)])
    return rows / rows.sum(axis=1, keepdims=True)


def _group_masks(rng: np.random.Generator, E: int, num_groups: int) -> np.ndarray:
    """A random split of the E experts into ``num_groups`` groups, as masks ``[groups, E]``."""
    group_of = rng.permutation(np.arange(E) % num_groups)
    return group_of[None, :] == np.arange(num_groups)[:, None]


def _sample(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct experts per row of ``probs`` ``[T, E]``, without replacement (Gumbel top-k)."""
    scores = np.log(np.maximum(probs, 1e-12)) + rng.gumbel(size=probs.shape)
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]
