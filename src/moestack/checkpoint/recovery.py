"""Recovery: pick the newest intact checkpoint, find the newest intact copy of every expert, read them.

With PEC a checkpoint holds only K experts per layer; the others come from the newest older
checkpoint of the same timeline (lineage) that holds them. A checkpoint that fails verification, or
whose experts cannot all be found intact, is skipped with a warning naming the bad file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from moestack.checkpoint import pec
from moestack.checkpoint.sharding import ExpertShard
from moestack.checkpoint.storage import Checkpoint, CheckpointError, expert_key, list_committed, read_tensors, verify

log = logging.getLogger("moestack.checkpoint")


@dataclass
class LoadReport:
    """What `CheckpointManager.load` restored, and what PEC recovery cost in lost tokens."""

    path: Path
    step: int
    skipped: list[str] = field(default_factory=list)  # problems of newer checkpoints passed over
    expert_sources: list[list[int]] = field(default_factory=list)  # [L][E] step each expert came from
    plt: float | None = None  # portion of lost tokens of the resumed state (all recoveries so far)
    lost_tokens: int = 0  # expert-tokens whose updates the resumed state lacks
    total_tokens: int = 0  # expert-tokens processed up to `step`

    @property
    def stale_experts(self) -> int:
        """Experts restored from a checkpoint older than `step`."""
        return sum(s != self.step for row in self.expert_sources for s in row)

    def summary(self) -> str:
        """One line for the log."""
        total = sum(len(row) for row in self.expert_sources)
        plt = "n/a" if self.plt is None else f"{100 * self.plt:.2f}%"
        return (f"loaded {self.path} (step {self.step}); {self.stale_experts}/{total} experts "
                f"from older checkpoints; PLT {plt}")


class Verifier:
    """`verify` with a cache, so a checkpoint read for several experts is checksummed once."""

    def __init__(self) -> None:
        self._seen: dict[Path, list[str]] = {}

    def problems(self, path: Path) -> list[str]:
        """Problems of the checkpoint at `path` (empty if intact)."""
        if path not in self._seen:
            self._seen[path] = verify(path)
        return self._seen[path]


def plan_recovery(root: Path, path: Path | None = None, verifier: Verifier | None = None) -> dict[str, Any]:
    """JSON-able plan {target, source_steps [L][E], skipped}: newest usable checkpoint (or `path`)."""
    verifier = verifier or Verifier()
    committed = [p for _, p in reversed(list_committed(root))]
    candidates = [Path(path)] if path is not None else committed
    skipped: list[str] = []
    for cand in candidates:
        try:
            problems = verifier.problems(cand)
            if problems:
                raise CheckpointError("; ".join(problems))
            target = Checkpoint.open(cand)
            older = [p for p in committed if _step_of(p) < target.step]
            sources = resolve_sources(target, older, verifier)
        except CheckpointError as e:
            if path is not None:
                raise CheckpointError(f"checkpoint {cand} is not usable: {e}") from None
            log.warning("checkpoint %s is not usable, falling back to an older one: %s", cand, e)
            skipped.append(str(e))
            continue
        return {"target": str(target.path), "source_steps": sources, "skipped": skipped}
    why = "; ".join(skipped) if skipped else "no committed checkpoint"
    raise CheckpointError(f"no intact checkpoint under {root}: {why}")


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def resolve_sources(target: Checkpoint, older: list[Path], verifier: Verifier) -> list[list[int]]:
    """[L][E] step of the newest intact copy of each expert: `target` itself or an older checkpoint."""
    names_by_layer: dict[int, set[str]] = {}
    for name, info in target.manifest["experts"].items():
        names_by_layer.setdefault(info["layer"], set()).add(name)
    history = _same_lineage(target, older)
    copy_step = pec.PecState.from_json(target.manifest["pec"]["state"]).copy_step  # [L, E]
    sources = []
    for layer, held in enumerate(target.manifest["pec"]["selected"]):
        row = []
        for e in range(int(target.manifest["pec"]["num_experts"])):
            if e in held:
                row.append(target.step)
                continue
            # never newer than the copy the target's timeline made: a checkpoint between a resume point and
            # the first save after it belongs to the timeline that resume left
            bound = int(copy_step[layer, e])
            candidates = [c for c in history if bound == pec.NEVER or c.step <= bound]
            src = _newest_copy(candidates, layer, e, names_by_layer.get(layer, set()), verifier)
            if src is None:
                raise CheckpointError(f"{target.path}: expert {e} of MoE layer {layer} has no intact copy "
                                      "in this or an older checkpoint")
            row.append(src.step)
        sources.append(row)
    return sources


def _same_lineage(target: Checkpoint, older: list[Path]) -> list[Checkpoint]:
    out = []
    for path in sorted(older, key=_step_of, reverse=True):
        try:
            ckpt = Checkpoint.open(path)
        except CheckpointError:
            continue
        if ckpt.lineage == target.lineage:
            out.append(ckpt)
    return out


def _newest_copy(history: list[Checkpoint], layer: int, expert: int, names: set[str],
                 verifier: Verifier) -> Checkpoint | None:
    for ckpt in history:
        if expert in ckpt.held(layer) and names <= set(ckpt.manifest["experts"]):
            if not verifier.problems(ckpt.path):
                return ckpt
    return None


def read_state(root: Path, plan: dict[str, Any], experts_wanted: Mapping[str, ExpertShard] | None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], LoadReport, pec.PecState]:
    """Read what `plan` names: non-expert tensors whole, expert tensors in the caller's layout."""
    target = Checkpoint.open(Path(plan["target"]))
    steps = {s for row in plan["source_steps"] for s in row} - {target.step}
    ckpts = {target.step: target, **{s: Checkpoint.open(root / f"step-{s:08d}") for s in steps}}
    handles: dict[Path, Any] = {}
    tensors = read_tensors(target, _non_expert_keys(target), handles)
    wanted = experts_wanted if experts_wanted is not None else _full_layout(target)
    for name, shard in wanted.items():
        tensors[name] = _read_expert(ckpts, plan["source_steps"], target, name, shard, handles)
    handles.clear()
    state = _recovered_state(ckpts, target, plan["source_steps"])
    report = _report(target, plan, state)
    return tensors, dict(target.manifest.get("meta", {})), report, state


def _non_expert_keys(ckpt: Checkpoint) -> list[str]:
    return [k for rec in ckpt.manifest["files"].values() for k, info in rec["tensors"].items() if "expert" not in info]


def _full_layout(ckpt: Checkpoint) -> dict[str, ExpertShard]:
    """Every expert, in global order: the layout of a single rank holding all experts (ep = 1)."""
    num = int(ckpt.manifest["pec"]["num_experts"])
    return {name: ExpertShard(info["layer"], tuple(range(num))) for name, info in ckpt.manifest["experts"].items()}


def _read_expert(ckpts: dict[int, Checkpoint], sources: list[list[int]], target: Checkpoint, name: str,
                 shard: ExpertShard, handles: dict[Path, Any]) -> torch.Tensor:
    info = target.manifest["experts"].get(name)
    if info is None:
        raise CheckpointError(f"{target.path}: no expert tensor {name!r} (it has {sorted(target.manifest['experts'])})")
    if info["layer"] != shard.layer:
        raise CheckpointError(f"{name}: saved as MoE layer {info['layer']}, requested as layer {shard.layer}")
    bad = [e for e in shard.global_ids if not 0 <= e < info["num_experts"]]
    if bad:
        raise CheckpointError(f"{name}: expert ids {bad} out of range, the checkpoint has {info['num_experts']}")
    slices = []
    for e in shard.global_ids:
        src = ckpts[sources[shard.layer][e]]
        slices.append(read_tensors(src, [expert_key(name, e)], handles)[expert_key(name, e)])
    if not slices:
        return torch.empty((0, *info["shape"]), dtype=getattr(torch, info["dtype"]))
    return torch.stack(slices)  # [E_wanted, ...]


def _recovered_state(ckpts: dict[int, Checkpoint], target: Checkpoint, sources: list[list[int]]) -> pec.PecState:
    target_state = pec.PecState.from_json(target.manifest["pec"]["state"])
    src_step = np.asarray(sources, dtype=np.int64).reshape(target_state.shape)  # [L, E]
    processed = np.zeros_like(src_step)
    lost = np.zeros_like(src_step)
    for step, ckpt in ckpts.items():
        mask = src_step == step
        state = pec.PecState.from_json(ckpt.manifest["pec"]["state"])
        processed[mask], lost[mask] = state.processed[mask], state.lost[mask]
    source = pec.PecState(processed, lost, src_step, processed, lost)
    return pec.recover(target_state, source, src_step)


def _report(target: Checkpoint, plan: dict[str, Any], state: pec.PecState) -> LoadReport:
    counted = bool(target.manifest["pec"].get("tokens_counted"))
    lost, total = int(state.lost.sum()), int(state.processed.sum())
    return LoadReport(
        path=target.path, step=target.step, skipped=list(plan["skipped"]), expert_sources=plan["source_steps"],
        plt=pec.portion_of_lost_tokens(state.lost, state.processed) if counted else None,
        lost_tokens=lost, total_tokens=total,
    )
