"""Expert-to-GPU placement: which GPU (EP rank) owns each expert of each MoE layer.

File format (JSON), the one the dispatcher consumes:

    {"format": "moestack.placement/v1", "num_gpus": G,
     "expert_to_gpu": [[gpu of expert e for e in range(E)] for each MoE layer]}

An optional ``"allow_uneven": true`` lifts the rule that every GPU holds E/G experts per layer.
Within a GPU the experts of a layer sit in ascending global-id order; that order is the local slot.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "moestack.placement/v1"
_FIELDS = ("format", "num_gpus", "expert_to_gpu", "allow_uneven")


class PlacementError(ValueError):
    """A placement file or object that breaks the format or the model's shape."""


@dataclass(frozen=True)
class Placement:
    """GPU of every expert in every MoE layer: ``expert_to_gpu[layer][expert] -> gpu``."""

    num_gpus: int
    expert_to_gpu: list[list[int]]
    allow_uneven: bool = False
    source: str = field(default="placement", compare=False, repr=False)  # named in errors

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_gpus: int) -> Placement:
        """Experts [0, E/G) on gpu 0, [E/G, 2E/G) on gpu 1, ... in every layer (plain EP)."""
        _check_divisible(num_experts, num_gpus, "placement")
        per_gpu = num_experts // num_gpus
        row = [e // per_gpu for e in range(num_experts)]
        return cls(num_gpus, [list(row) for _ in range(num_layers)])

    @classmethod
    def from_array(cls, gpu_of: np.ndarray, num_gpus: int, source: str = "placement") -> Placement:
        """Build from an integer array ``[L, E]`` of gpu ids (validated)."""
        rows = [[int(g) for g in row] for row in np.asarray(gpu_of)]
        placement = cls(num_gpus, rows, source=source)
        placement.validate()
        return placement

    @classmethod
    def load(cls, path: str | os.PathLike) -> Placement:
        """Read and validate a ``moestack.placement/v1`` JSON file."""
        name = str(path)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlacementError(f"{name}: file not found") from None
        except IsADirectoryError:
            raise PlacementError(f"{name}: is a folder; pass the placement JSON file `moestack plan` wrote") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PlacementError(f"{name}: not valid JSON ({err})") from None
        return cls._from_dict(raw, name)

    @classmethod
    def _from_dict(cls, raw: object, name: str) -> Placement:
        if not isinstance(raw, dict):
            raise PlacementError(f"{name}: top level must be a JSON object with fields {list(_FIELDS[:3])}")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise PlacementError(f"{name}: unknown field {unknown[0]!r}; allowed fields are {list(_FIELDS)}")
        for key in _FIELDS[:3]:
            if key not in raw:
                raise PlacementError(f"{name}: missing field {key!r}")
        if raw["format"] != FORMAT:
            raise PlacementError(f"{name}: field 'format' is {raw['format']!r} but must be {FORMAT!r}")
        allow_uneven = raw.get("allow_uneven", False)
        if not isinstance(allow_uneven, bool):
            raise PlacementError(f"{name}: field 'allow_uneven' must be true or false, got {allow_uneven!r}")
        placement = cls(raw["num_gpus"], raw["expert_to_gpu"], allow_uneven, source=name)
        placement.validate()
        return placement

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically (a failed write never leaves a half file at ``path``)."""
        self.validate()
        # int(): numpy integers pass validation but are not JSON numbers
        doc: dict = {"format": FORMAT, "num_gpus": int(self.num_gpus),
                     "expert_to_gpu": [[int(g) for g in row] for row in self.expert_to_gpu]}
        if self.allow_uneven:
            doc["allow_uneven"] = True
        body = "{\n" + ",\n".join(_json_field(k, v) for k, v in doc.items()) + "\n}\n"
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- validation ---------------------------------------------------------------------------

    def validate(
        self, num_layers: int | None = None, num_experts: int | None = None, num_gpus: int | None = None
    ) -> None:
        """Raise `PlacementError` unless the placement is well formed (and matches the model if given)."""
        name = self.source
        G = self.num_gpus
        if not _is_int(G) or G < 1:
            raise PlacementError(f"{name}: field 'num_gpus' must be a positive integer, got {G!r}")
        rows = self.expert_to_gpu
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise PlacementError(f"{name}: field 'expert_to_gpu' must be a non-empty list of lists (one per MoE layer)")
        E = len(rows[0])
        if E == 0:
            raise PlacementError(f"{name}: field 'expert_to_gpu' layer 0 lists no experts")
        for layer, row in enumerate(rows):
            _check_row(name, layer, row, E, G)
        if not self.allow_uneven:
            _check_divisible(E, G, name)
            for layer, row in enumerate(rows):
                _check_even(name, layer, row, E, G)
        _check_model(name, len(rows), E, G, num_layers, num_experts, num_gpus)

    # --- queries -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.expert_to_gpu)

    @property
    def num_experts(self) -> int:
        """Number of (global) experts per MoE layer."""
        return len(self.expert_to_gpu[0])

    def experts_on(self, layer: int, gpu: int) -> list[int]:
        """Global ids of the experts ``gpu`` holds in ``layer``, ascending (= local slot order)."""
        return [e for e, g in enumerate(self.expert_to_gpu[layer]) if g == gpu]

    def local_to_global(self, layer: int, gpu: int) -> list[int]:
        """``result[local_slot] = global expert id`` on ``gpu`` in ``layer``."""
        return self.experts_on(layer, gpu)

    def slot_of(self, layer: int, expert: int) -> tuple[int, int]:
        """``(gpu, local_slot)`` of a global expert in ``layer``."""
        row = self.expert_to_gpu[layer]
        gpu = row[expert]
        return gpu, sum(1 for g in row[:expert] if g == gpu)

    def to_array(self) -> np.ndarray:
        """Gpu ids as an int64 array ``[L, E]``."""
        return np.asarray(self.expert_to_gpu, dtype=np.int64)


def _json_field(key: str, value: object) -> str:
    """One field per line and one layer per line: readable, and diffs stay small."""
    if key == "expert_to_gpu":
        layers = ",\n".join("    " + json.dumps(row) for row in value)  # type: ignore[union-attr]
        return f'  "{key}": [\n{layers}\n  ]'
    return f'  "{key}": {json.dumps(value)}'


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_divisible(E: int, G: int, name: str) -> None:
    if E % G:
        raise PlacementError(
            f"{name}: E={E} experts cannot be split evenly over G={G} gpus; "
            f"use a gpu count that divides {E}, or set \"allow_uneven\": true"
        )


def _check_row(name: str, layer: int, row: list, E: int, G: int) -> None:
    if len(row) != E:
        raise PlacementError(f"{name}: layer {layer} lists {len(row)} experts but layer 0 lists {E}")
    for expert, gpu in enumerate(row):
        if not _is_int(gpu):
            raise PlacementError(f"{name}: layer {layer} expert {expert} has gpu {gpu!r}; gpus must be integers")
        if not 0 <= gpu < G:
            raise PlacementError(
                f"{name}: layer {layer} expert {expert} is on gpu {gpu} but gpus are 0..{G - 1} (num_gpus={G})"
            )


def _check_even(name: str, layer: int, row: list, E: int, G: int) -> None:
    per_gpu = E // G
    held = np.bincount(np.asarray(row, dtype=np.int64), minlength=G)
    for gpu, count in enumerate(held):
        if count != per_gpu:
            raise PlacementError(
                f"{name}: layer {layer} puts {count} experts on gpu {gpu} but each gpu must hold "
                f"{per_gpu} (E={E}, G={G}); set \"allow_uneven\": true to allow this"
            )


def _check_model(name: str, L: int, E: int, G: int, want_L, want_E, want_G) -> None:
    if want_L is not None and L != want_L:
        raise PlacementError(f"{name}: field 'expert_to_gpu' has {L} MoE layers but the model has {want_L}")
    if want_E is not None and E != want_E:
        raise PlacementError(f"{name}: field 'expert_to_gpu' has {E} experts per layer but the model has {want_E}")
    if want_G is not None and G != want_G:
        hint = f"; start it under torchrun --nproc_per_node {G}" if want_G == 1 else ""
        raise PlacementError(f"{name}: field 'num_gpus' is {G} but the run has {want_G} expert-parallel ranks{hint}")
