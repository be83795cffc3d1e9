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
    fanout: int = 4,
    clusters: int | None = None,
    seed: int = 0,
) -> RoutingTrace:
    """Simulate token routing through ``num_layers`` MoE layers.

    Expert popularity per layer is Zipf-like (weight of the r-th most popular expert ~ 1/(r+1)**skew,
    shuffled per layer). With probability ``affinity`` a token's next-layer experts are drawn from the
    successors of its current experts: each expert has ``fanout`` preferred successors, mostly in the same
    latent cluster (``clusters`` random groups per layer, default E / (2 * fanout)); otherwise they are drawn by popularity.
    Every token picks ``top_k`` distinct experts per layer (Gumbel top-k).
    """
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    fanout = max(1, min(fanout, E // 2))
    clusters = clusters or max(1, E // (2 * fanout))
    popularity = _popularity(rng, L, E, skew)  # [L, E]
    successors = _successors(rng, L, E, fanout, clusters)  # [L-1, E, E] rows sum to 1
    recorder = TraceRecorder(L, E, k)
    ids = _sample(rng, np.tile(popularity[0], (num_tokens, 1)), k)  # [T, k]
    recorder.record(0, ids)
    for layer in range(1, L):
        follow = successors[layer - 1][ids].mean(axis=1)  # [T, E]
        probs = (1 - affinity) * popularity[layer] + affinity * follow  # [T, E]
        ids = _sample(rng, probs, k)
        recorder.record(layer, ids)
    return recorder.trace()


def _popularity(rng: np.random.Generator, L: int, E: int, skew: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, E + 1) ** skew
    rows = np.stack([rng.permutation(weights) for _ in range(L)])
    return rows / rows.sum(axis=1, keepdims=True)


def _successors(rng: np.random.Generator, L: int, E: int, fanout: int, clusters: int) -> np.ndarray:
    """Per boundary, each expert's distribution over next-layer experts (``fanout`` favourites)."""
    out = np.zeros((max(L - 1, 0), E, E))
    fanout = min(fanout, E)
    for layer in range(L - 1):
        group_here = rng.permutation(np.arange(E) % clusters)
        group_next = rng.permutation(np.arange(E) % clusters)
        for i in range(E):
            same = np.flatnonzero(group_next == group_here[i])
            pool = same if len(same) >= fanout and rng.random() < 0.8 else np.arange(E)
            picks = rng.choice(pool, size=fanout, replace=False)
            out[layer, i, picks] = rng.dirichlet(np.ones(fanout))
    return out


def _sample(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct experts per row of ``probs`` ``[T, E]``, without replacement (Gumbel top-k)."""
    scores = np.log(np.maximum(probs, 1e-12)) + rng.gumbel(size=probs.shape)
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]
