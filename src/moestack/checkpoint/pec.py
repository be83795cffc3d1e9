"""Partial Experts Checkpointing (PEC): which experts to save, and the tokens a recovery loses.

Notation: L = MoE layers, E = experts per layer. Every array here is int64 [L, E].
A *copy* of an expert is its slice in a committed checkpoint; its *live* state is the one training holds.
PLT (portion of lost tokens, MoC-System arXiv 2408.04307) = tokens whose expert updates are not in the
(recovered) state / all expert-tokens processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

NEVER = -1  # copy_step of an expert that has no saved copy yet


def select_experts_to_save(
    policy: str, k: int, copy_step: np.ndarray, unsaved_tokens: np.ndarray
) -> list[list[int]]:
    """Global expert ids to save per layer (sorted), K of them.

    sequential: least recently saved first, ties by id (round robin: each expert every ceil(E/K) saves).
    load_aware: most tokens processed since last saved first, ties as sequential.
    Experts never saved (copy_step == -1) are always included, so every expert has a copy;
    k == 0 or k >= E saves all.
    """
    if policy not in ("sequential", "load_aware"):
        raise ValueError(f"unknown PEC policy {policy!r}; use sequential|load_aware")
    num_layers, num_experts = copy_step.shape
    if k <= 0 or k >= num_experts:
        return [list(range(num_experts)) for _ in range(num_layers)]
    return [_select_layer(policy, k, copy_step[i], unsaved_tokens[i]) for i in range(num_layers)]


def _select_layer(policy: str, k: int, copy_step: np.ndarray, unsaved: np.ndarray) -> list[int]:
    ids = np.arange(copy_step.shape[0])
    if policy == "sequential":
        order = np.lexsort((ids, copy_step))  # last key is primary: oldest copy, then lowest id
    else:
        order = np.lexsort((ids, copy_step, -unsaved))  # most unsaved tokens first
    chosen = {int(e) for e in ids[copy_step == NEVER]}
    for e in order:
        if len(chosen) >= k:
            break
        chosen.add(int(e))
    return sorted(chosen)


@dataclass(frozen=True)
class PecState:
    """Per-expert token accounting behind load-aware selection and PLT (immutable; arrays int64 [L, E])."""

    processed: np.ndarray  # tokens each expert processed on the surviving timeline
    lost: np.ndarray  # of those, tokens whose updates the live state lacks (lost in past recoveries)
    copy_step: np.ndarray  # step of the newest saved copy, -1 = never saved
    copy_processed: np.ndarray  # `processed` when that copy was taken
    copy_lost: np.ndarray  # `lost` when that copy was taken

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> "PecState":
        """State of a fresh run: nothing processed, nothing saved."""
        zeros = np.zeros((num_layers, num_experts), dtype=np.int64)
        return cls(zeros, zeros, np.full_like(zeros, NEVER), zeros, zeros)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, E)."""
        return tuple(self.processed.shape)  # type: ignore[return-value]

    def add_tokens(self, tokens: np.ndarray) -> "PecState":
        """Count tokens [L, E] processed since the previous call."""
        return _replace(self, processed=self.processed + tokens)

    def unsaved(self) -> np.ndarray:
        """Tokens each expert processed since its newest copy was taken."""
        return self.processed - self.copy_processed

    def after_save(self, step: int, selected: Sequence[Sequence[int]]) -> "PecState":
        """State once a checkpoint at `step` holding `selected` experts per layer is committed."""
        mask = selection_mask(selected, self.shape)
        return _replace(
            self,
            copy_step=np.where(mask, step, self.copy_step),
            copy_processed=np.where(mask, self.processed, self.copy_processed),
            copy_lost=np.where(mask, self.lost, self.copy_lost),
        )

    def lost_if_failed(self) -> np.ndarray:
        """Lost tokens per expert if training restarted from the newest copies now."""
        return self.copy_lost + self.processed - self.copy_processed

    def plt(self) -> float:
        """PLT if a failure happened now and every expert came back from its newest copy."""
        return portion_of_lost_tokens(self.lost_if_failed(), self.processed)

    def to_json(self) -> dict[str, Any]:
        """Plain lists for the manifest."""
        return {"shape": list(self.shape), **{name: getattr(self, name).tolist() for name in _ARRAYS}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PecState":
        """Inverse of `to_json`."""
        shape = tuple(data["shape"])
        return cls(**{name: np.asarray(data[name], dtype=np.int64).reshape(shape) for name in _ARRAYS})


_ARRAYS = ("processed", "lost", "copy_step", "copy_processed", "copy_lost")


def _replace(state: PecState, **arrays: np.ndarray) -> PecState:
    values = {name: arrays.get(name, getattr(state, name)) for name in _ARRAYS}
    return PecState(**{k: np.asarray(v, dtype=np.int64) for k, v in values.items()})


def selection_mask(selected: Sequence[Sequence[int]], shape: tuple[int, int]) -> np.ndarray:
    """Boolean [L, E] mask of the selected experts."""
    mask = np.zeros(shape, dtype=bool)
    for layer, ids in enumerate(selected):
        mask[layer, list(ids)] = True
    return mask


def portion_of_lost_tokens(lost: np.ndarray, processed: np.ndarray) -> float:
    """Sum of lost over sum of processed expert-tokens (0.0 before any token)."""
    total = int(processed.sum())
    return float(lost.sum()) / total if total else 0.0


def recover(target: PecState, source: PecState, source_step: np.ndarray) -> PecState:
    """State after restarting from checkpoint `target` with each expert taken from an older copy.

    `source` holds, per expert, the checkpointed (processed, lost) of the checkpoint its copy came
    from (`source_step` [L, E]); the tokens that expert processed after that copy are lost.
    """
    lost = source.lost + target.processed - source.processed  # [L, E]
    return PecState(
        processed=target.processed.copy(),
        lost=lost,
        copy_step=source_step.astype(np.int64),
        copy_processed=source.processed.copy(),
        copy_lost=source.lost.copy(),
    )


def choose_k(state: PecState, policy: str, k_min: int, threshold: float, step: int) -> int:
    """Adaptive K: the smallest K >= k_min whose checkpoint keeps PLT <= threshold (E if none does)."""
    num_experts = state.shape[1]
    for k in range(max(k_min, 1), num_experts):
        selected = select_experts_to_save(policy, k, state.copy_step, state.unsaved())
        if state.after_save(step, selected).plt() <= threshold:
            return k
    return num_experts
