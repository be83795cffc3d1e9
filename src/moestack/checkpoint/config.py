"""The `[checkpoint]` section of the moestack config."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

PEC_POLICIES = ("sequential", "load_aware")
WHEN_BUSY = ("wait", "skip", "defer")


@dataclass(frozen=True)
class CheckpointConfig:
    """How often and how much to checkpoint (TOML section `[checkpoint]`).

    every            save every N optimizer steps; 0 turns checkpointing off
    keep             committed checkpoints to keep (older ones still needed by PEC recovery are kept too)
    pec_k            experts saved per MoE layer and checkpoint (PEC); 0 = all experts (full checkpoints)
    pec_policy       "sequential" (round robin) or "load_aware" (most tokens since last saved first)
    async_save       persist in a background thread; False writes and commits inside `save`
    when_busy        a save due while the previous one still persists: "wait" (block), "skip" (log, skip) or
                     "defer" (take it at the first later step whose save finds the persist done; the
                     trainer calls save every step while `CheckpointManager.deferred` is set). The last
                     step's checkpoint always waits.
    plt_threshold    > 0 turns on adaptive K: raise K until the portion of lost tokens stays <= this
    commit_timeout_s rank 0 waits this long for the other ranks' shards before failing the save
    """

    every: int = 0
    keep: int = 2
    pec_k: int = 0
    pec_policy: str = "sequential"
    async_save: bool = True
    when_busy: str = "wait"
    plt_threshold: float = 0.0
    commit_timeout_s: float = 600.0

    def validate(self) -> "CheckpointConfig":
        """Raise ValueError naming the first bad field and its fix; return self when all are valid."""
        _check_int("every", self.every, minimum=0)
        _check_int("keep", self.keep, minimum=1)
        _check_int("pec_k", self.pec_k, minimum=0)
        _check_choice("pec_policy", self.pec_policy, PEC_POLICIES)
        _check_choice("when_busy", self.when_busy, WHEN_BUSY)
        if not isinstance(self.async_save, bool):
            raise ValueError(f"checkpoint.async_save must be true or false, got {self.async_save!r}")
        _check_float("plt_threshold", self.plt_threshold, low=0.0, high=1.0)
        _check_float("commit_timeout_s", self.commit_timeout_s, low=0.0, high=float("inf"))
        if self.commit_timeout_s <= 0:
            raise ValueError("checkpoint.commit_timeout_s must be > 0 seconds")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CheckpointConfig":
        """Build and validate a config from a TOML table; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown [checkpoint] field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values)).validate()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"checkpoint.{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"checkpoint.{name} must be one of {'|'.join(choices)}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"checkpoint.{name} must be a number in [{low}, {high}), got {value!r}")
