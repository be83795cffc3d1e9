"""CheckpointManager: two-level asynchronous, fully sharded, partial-expert checkpoints.

save():  [main thread]  agree with the other ranks (busy? layout changed? errors?), choose the PEC
                        experts, plan who writes what, snapshot this rank's share into reused host
                        buffers (level 1, snapshot.py; on CUDA the copies are only queued), return.
         [main thread, later] wait_snapshot() before the state changes in place (the optimizer step):
                        the device-to-host copies overlap the next forward and backward until then.
         [persist thread] wait for those copies, write this rank's shard, rank 0 commits (level 2, persist.py).
Collectives happen only in the main thread, inside save / wait / load / close (all collective calls);
the persist threads talk through files in the shared checkpoint directory, never through the group.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from moestack.checkpoint import pec
from moestack.checkpoint.config import CheckpointConfig
from moestack.checkpoint.persist import Job, Persister, SaveHandle
from moestack.checkpoint.recovery import LoadReport, Verifier, plan_recovery, read_state
from moestack.checkpoint.sharding import (
    ExpertShard, Item, Layout, expert_geometry, expert_summary, layout_digest, local_layout, plan_shards,
)
from moestack.checkpoint.snapshot import Snapshotter
from moestack.checkpoint.storage import FORMAT, Checkpoint, CheckpointError, clean_leftovers, step_dir_name

log = logging.getLogger("moestack.checkpoint")


class CheckpointManager:
    """Saves and restores a flat training state (dict of tensors + JSON meta) under RUN_DIR/ckpt.

    Expert-stacked tensors (dim 0 = this rank's local expert slots) are described by `ExpertShard`s.
    `group` is the torch.distributed group whose ranks share the state (None = single process); all
    ranks must see the same RUN_DIR. save, wait, load and close are collective over `group`.
    """

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, group: Any = None):
        self.cfg = cfg.validate()
        self.root = Path(run_dir) / "ckpt"
        self.group = group
        self.rank, self.world_size = _rank_world(group)
        self._persister = Persister(self.root, self.rank, self.world_size, cfg.keep, cfg.commit_timeout_s)
        self._snap = Snapshotter()
        self._handle: SaveHandle | None = None
        self._copying: SaveHandle | None = None  # the checkpoint whose snapshot copies may still run
        self._thread: threading.Thread | None = None
        self._failed_prev: pec.PecState | None = None
        self._pec: pec.PecState | None = None
        self._tokens_counted = False
        self._digests: list[str] | None = None
        self._layouts: list[Layout] = []
        self._summary: dict[str, Any] = {}
        self._seq = 0
        self._closed = False
        # when_busy = "defer": the step whose checkpoint is owed (the caller saves every step until it is None)
        self.deferred: int | None = None
        self._verifier = Verifier()
        self._cleaned = False  # leftovers of killed saves are removed at the first save, not by readers
        self._resumed_step: int | None = None  # set by load(): the first commit abandons every later step
        self._nonce = self._broadcast(secrets.token_hex(4) if self.rank == 0 else None)
        self._lineage = self._nonce

    # ------------------------------------------------------------------ public API

    def due(self, step: int) -> bool:
        """Whether `cfg.every` asks for a checkpoint after `step`, or a deferred one is still owed."""
        return self.cfg.every > 0 and step > 0 and (step % self.cfg.every == 0 or self.deferred is not None)

    def save(self, step: int, tensors: Mapping[str, torch.Tensor], experts: Mapping[str, ExpertShard],
             meta: Mapping[str, Any], expert_tokens: torch.Tensor | None = None, full: bool = False) -> SaveHandle:
        """Snapshot the state at `step` and persist it in the background (collective).

        full: save every expert whatever `pec_k` says (the trainer does this at the last step).

        expert_tokens: int64 [L, E], tokens each global expert processed since the previous call
        (already summed over ranks); it drives load-aware PEC and PLT. On CUDA it returns with the snapshot
        copies still running: call `wait_snapshot` before changing the saved tensors in place.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
        step = int(step)
        self.wait_snapshot()  # charged to the previous checkpoint's blocked_s, not to this one
        t0 = time.perf_counter()
        meta = json.loads(json.dumps(dict(meta)))  # JSON only, never pickle; fails early on bad meta
        layout = local_layout(tensors, experts)
        if not self._cleaned:
            self._clean_leftovers()  # before the exchange below: no rank has started writing this save yet
        if self.cfg.when_busy == "wait" or full:  # the last checkpoint of a run is never skipped
            self._join_local()
        views = self._agree(layout)
        self._count_tokens(expert_tokens)
        self._check_errors(views)
        if any(v["busy"] for v in views):
            return self._skip(step, t0)
        self.deferred = None
        selected, k = self._select(step, full)
        handle = self._start(step, tensors, experts, dict(meta), selected, k, t0)
        handle.blocked_s = time.perf_counter() - t0
        if not self.cfg.async_save:  # written and committed inside save: a failure is this call's error
            self._check_errors(self._exchange({"error": self._local_error()}))
        return handle

    def wait_snapshot(self) -> float:
        """Block until the newest checkpoint's snapshot copies are complete (local); the seconds waited.

        Call it before the saved state changes in place; the time is added to that checkpoint's `blocked_s`.
        Returns 0.0 when nothing is in flight (always on CPU, where `save` copies synchronously).
        """
        waited = self._snap.wait()
        if self._copying is not None:
            self._copying.blocked_s += waited
            self._copying = None
        return waited

    def wait(self) -> None:
        """Block until the in-flight checkpoint is committed (collective); raise CheckpointError if it failed."""
        self.wait_snapshot()
        self._join_local()
        self._check_errors(self._exchange({"error": self._local_error()}))

    def close(self) -> None:
        """Finish the in-flight checkpoint and free the host buffers (collective, idempotent)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.wait_snapshot()  # again, in case wait() raised before it: never free buffers mid-copy
            self._snap.close()

    def latest_good(self) -> Path | None:
        """Newest committed checkpoint that verifies and whose experts all have an intact copy (local)."""
        try:
            return Path(plan_recovery(self.root, verifier=self._verifier)["target"])
        except CheckpointError:
            return None

    def load(self, path: str | Path | None = None, experts_wanted: Mapping[str, ExpertShard] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], LoadReport]:
        """Restore the newest good checkpoint (or `path`) (collective).

        Returns (tensors, meta, report): non-expert tensors whole; each expert-stacked tensor built for
        the caller's layout `experts_wanted` (default: all experts in global order), every expert from
        the newest intact checkpoint holding it. The manager continues PEC and PLT from there.
        """
        self.wait()
        plan: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                plan = plan_recovery(self.root, Path(path) if path is not None else None, self._verifier)
            except CheckpointError as e:
                plan = {"error": str(e)}
            self._verifier = Verifier()  # checksums are reused from latest_good() only until here
        plan = self._broadcast(plan)
        if "error" in plan:
            raise CheckpointError(plan["error"])
        tensors, meta, report, state = read_state(self.root, plan, experts_wanted)
        target = Checkpoint.open(Path(plan["target"]))
        self._pec, self._lineage = state, target.lineage
        self._resumed_step = target.step
        self._tokens_counted = bool(target.manifest["pec"].get("tokens_counted"))
        log.info(report.summary())
        return tensors, meta, report

    # ------------------------------------------------------------------ main-thread steps of save

    def _agree(self, layout: Layout) -> list[dict[str, Any]]:
        """Exchange (busy, error, layout digest) with all ranks; refresh the layouts when one changed.

        Every decision after this (skip, raise, the shard plan) is taken from what all ranks reported,
        so the ranks always take the same branch."""
        digest = layout_digest(layout)
        busy = self._thread is not None and self._thread.is_alive()
        views = self._exchange({"busy": busy, "error": None if busy else self._local_error(), "digest": digest})
        digests = [v["digest"] for v in views]
        if digests != self._digests:
            layouts = self._exchange(layout)
            num_layers, num_experts = expert_geometry(layouts)
            self._summary = expert_summary(layouts, num_experts)
            self._layouts, self._digests = layouts, digests
        return views

    def _count_tokens(self, expert_tokens: torch.Tensor | None) -> None:
        shape = expert_geometry(self._layouts)
        if expert_tokens is not None:
            tokens = expert_tokens.detach().cpu().numpy().astype(np.int64)  # [L, E]
            if tokens.ndim != 2 or tokens.shape[0] < shape[0] or tokens.shape[1] != shape[1]:
                raise ValueError(f"expert_tokens has shape {tokens.shape}, expected [L >= {shape[0]}, E = {shape[1]}]")
            shape = tokens.shape
        if self._pec is None:
            self._pec = pec.PecState.empty(*shape)
        if self._pec.shape != tuple(shape):
            raise CheckpointError(f"expert layout [L, E] changed from {list(self._pec.shape)} to {list(shape)}")
        if expert_tokens is not None:
            self._pec = self._pec.add_tokens(tokens)
            self._tokens_counted = True

    def _skip(self, step: int, t0: float) -> SaveHandle:
        prev = self._handle.step if self._handle else -1
        if self.cfg.when_busy == "defer":
            if self.deferred is None:  # decided from the views all ranks exchanged: the same on every rank
                self.deferred = step
                log.info("checkpoint due at step %d deferred: the previous one (step %d) is still being "
                         "written; it is taken at the first step that finds the write done", step, prev)
        else:
            log.warning("checkpoint at step %d skipped: the previous one (step %d) is still being written "
                        "(checkpoint.when_busy = skip)", step, prev)
        handle = SaveHandle(step, skipped=True)
        handle.blocked_s = time.perf_counter() - t0
        return handle

    def _select(self, step: int, full: bool = False) -> tuple[list[list[int]], int]:
        state, cfg = self._pec, self.cfg
        k = 0 if full else cfg.pec_k
        if cfg.plt_threshold > 0 and self._tokens_counted and 0 < k < state.shape[1]:
            k = pec.choose_k(state, cfg.pec_policy, k, cfg.plt_threshold, step)
        selected = pec.select_experts_to_save(cfg.pec_policy, k, state.copy_step, state.unsaved())
        # a copy at >= this step lives in a checkpoint this commit moves aside: save that expert again
        doomed = state.copy_step >= self._abandon_from(step)
        return [sorted(set(row) | set(np.flatnonzero(doomed[i]).tolist())) for i, row in enumerate(selected)], k

    def _abandon_from(self, step: int) -> int:
        return step if self._resumed_step is None else min(step, self._resumed_step + 1)

    def _start(self, step: int, tensors: Mapping[str, torch.Tensor], experts: Mapping[str, ExpertShard],
               meta: dict[str, Any], selected: list[list[int]], k: int, t0: float) -> SaveHandle:
        items = plan_shards(self._layouts, selected)[self.rank]
        self._join_local()  # no-op (the caller made sure no persist runs): it may no longer read the buffers
        host = self._snap.snapshot(_sources(items, tensors, experts))  # level 1; CUDA copies still running
        prev, self._pec = self._pec, self._pec.after_save(step, selected)
        plt = self._pec.plt() if self._tokens_counted else None
        self._seq += 1
        uid = f"{self._nonce}-{self._seq}"
        handle = SaveHandle(step, skipped=False, selected=selected, plt=plt)
        # the first commit after a resume moves aside every later checkpoint: they belong to the timeline left
        abandon_from = self._abandon_from(step)
        self._resumed_step = None
        job = Job(step, self.root / f".tmp-{step_dir_name(step)}-{uid}", self.root / step_dir_name(step), host,
                   {it.key: _record(it) for it in items},
                   self._manifest(step, uid, selected, k, plt, meta) if self.rank == 0 else None, handle, t0,
                   copies=self._snap.pending(), abandon_from=abandon_from)
        self._handle, self._failed_prev, self._copying = handle, prev, handle
        if self.cfg.async_save:
            self._thread = threading.Thread(target=self._persister.run, args=(job,), name=f"ckpt-persist-{step}")
            self._thread.start()
        else:
            self._persister.run(job)
        return handle

    def _manifest(self, step: int, uid: str, selected: list[list[int]], k: int, plt: float | None,
                  meta: dict[str, Any]) -> dict[str, Any]:
        num_layers, num_experts = self._pec.shape
        return {
            "format": FORMAT, "step": step, "uid": uid, "lineage": self._lineage, "world_size": self.world_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "plt": plt,
            "pec": {"policy": self.cfg.pec_policy, "k": k, "num_layers": num_layers, "num_experts": num_experts,
                    "selected": selected, "tokens_counted": self._tokens_counted, "state": self._pec.to_json()},
            "experts": self._summary, "meta": meta,
        }

    # ------------------------------------------------------------------ errors and collectives

    def _clean_leftovers(self) -> None:
        """Remove what killed saves left (rank 0). Only a manager that saves does this: a reader of a run in
        progress (eval, generate) must not delete the save its trainer is writing."""
        self._cleaned = True
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            removed = clean_leftovers(self.root)
            if removed:
                log.info("removed leftovers of interrupted saves in %s: %s", self.root, removed)

    def _join_local(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _local_error(self) -> str | None:
        h = self._handle
        return f"step {h.step}: {type(h.error).__name__}: {h.error}" if h and h.done() and h.error else None

    def _check_errors(self, views: list[dict[str, Any]]) -> None:
        """Raise on every rank when any rank's last persist failed (PEC then forgets that save)."""
        errors = [f"rank {r}: {v['error']}" for r, v in enumerate(views) if v.get("error")]
        if not errors:
            return
        self._handle = None
        if self._pec is not None and self._failed_prev is not None:
            prev = self._failed_prev  # keep the tokens counted since, undo the copies that never landed
            self._pec = pec.PecState(self._pec.processed, self._pec.lost, prev.copy_step, prev.copy_processed,
                                     prev.copy_lost)
        raise CheckpointError("checkpoint persist failed: " + "; ".join(errors))

    def _exchange(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]


def _rank_world(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _sources(items: list[Item], tensors: Mapping[str, torch.Tensor], experts: Mapping[str, ExpertShard]
             ) -> dict[str, torch.Tensor]:
    """key -> the tensor (or the expert's dim-0 slice) this rank writes."""
    slots = {name: {e: i for i, e in enumerate(shard.global_ids)} for name, shard in experts.items()}
    out = {}
    for it in items:
        t = tensors[it.name].detach()
        out[it.key] = t if it.expert is None else t[slots[it.name][it.expert]]
    return out


def _record(item: Item) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": item.name, "shape": list(item.shape), "dtype": item.dtype}
    if item.expert is not None:
        rec.update(layer=item.layer, expert=item.expert)
    return rec
