"""Baseline placements the ILP is compared with (and warm-started from).

Each takes the trace (for its shape and loads) and the gpu count and returns a `Placement`
with E/G experts on every gpu in every layer.
"""

from __future__ import annotations

import numpy as np

from .placement import Placement, PlacementError
from .trace import RoutingTrace


def _shape(trace: RoutingTrace, num_gpus: int) -> tuple[int, int, int]:
    L, E = trace.counts.shape
    if num_gpus < 1 or E % num_gpus:
        raise PlacementError(
            f"--gpus: E={E} experts cannot be split evenly over G={num_gpus} gpus; use a gpu count that divides {E}"
        )
    return L, E, E // num_gpus


def contiguous(trace: RoutingTrace, num_gpus: int) -> Placement:
    """Expert e on gpu e // (E/G): what plain expert parallelism does."""
    L, E, _ = _shape(trace, num_gpus)
    return Placement.contiguous(L, E, num_gpus)


def round_robin(trace: RoutingTrace, num_gpus: int) -> Placement:
    """Expert e on gpu e % G."""
    L, E, _ = _shape(trace, num_gpus)
    row = np.arange(E) % num_gpus
    return Placement.from_array(np.tile(row, (L, 1)), num_gpus)


def greedy_layer(loads: np.ndarray, num_gpus: int) -> np.ndarray:
    """Balanced packing of one layer: heaviest expert first onto the least-loaded gpu with a free slot.

    ``loads`` is ``[E]``; returns the gpu of each expert ``[E]``. Ties go to the lower gpu id.
    """
    E = loads.shape[0]
    slots = np.full(num_gpus, E // num_gpus)
    gpu_load = np.zeros(num_gpus)
    gpu_of = np.empty(E, dtype=np.int64)
    for e in np.argsort(-loads, kind="stable"):
        open_gpus = np.flatnonzero(slots > 0)
        g = open_gpus[np.argmin(gpu_load[open_gpus])]
        gpu_of[e], slots[g], gpu_load[g] = g, slots[g] - 1, gpu_load[g] + loads[e]
    return gpu_of


def greedy(trace: RoutingTrace, num_gpus: int) -> Placement:
    """Per layer, balanced packing by load like DeepSeek's EPLB without replication (ignores transitions)."""
    _shape(trace, num_gpus)
    rows = [greedy_layer(counts.astype(np.float64), num_gpus) for counts in trace.counts]
    return Placement.from_array(np.stack(rows), num_gpus)


def random(trace: RoutingTrace, num_gpus: int, seed: int = 0) -> Placement:
    """A uniformly random balanced placement per layer, reproducible from ``seed``."""
    L, E, _ = _shape(trace, num_gpus)
    rng = np.random.default_rng(seed)
    row = np.arange(E) % num_gpus
    return Placement.from_array(np.stack([rng.permutation(row) for _ in range(L)]), num_gpus)
