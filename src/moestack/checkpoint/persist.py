"""Level 2 of the two-level checkpoint: persist a snapshot, commit it atomically, apply retention.

Commit protocol (no collectives: it runs in a background thread on every rank):
  1. every rank writes rank-R.safetensors (rank-R-1..., above 1 GiB) into the shared .tmp-step-N-<uid>/ and fsyncs it, then
     writes its manifest part rank-R.json (tmp file + fsync + rename), last; a failing rank writes
     rank-R.error instead;
  2. rank 0 polls for all parts (commit_timeout_s), merges them into manifest.json (atomic write),
     moves aside committed checkpoints at >= N, or after the step a resume started from (an
     abandoned timeline), renames the directory to
     step-N, fsyncs the parent, replaces `latest` atomically, and applies retention.
A crash at any point leaves either the previous state or the new committed checkpoint, never half of one.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moestack.checkpoint.storage import (
    MANIFEST, Checkpoint, CheckpointError, commit_dir, list_committed, move_aside, part_name, read_latest,
    remove_dir, step_dir_name, structure_problem, write_json_atomic, write_latest, write_shards,
)

log = logging.getLogger("moestack.checkpoint")
_POLL_S = 0.01


class SaveHandle:
    """What `save` returns once the snapshot is taken; the persist may still be running.

    blocked_s: time `save` kept the training loop waiting, plus, once the manager's `wait_snapshot` (or
    the next save / wait / load / close) ran, the time it waited there for this checkpoint's device-to-host
    copies (CUDA; they overlap the next step until then). After `wait()`: bytes_written (this rank),
    persist_s (from the call to save to this rank's part written; on rank 0 to the commit), and on
    rank 0 path (the committed directory) and total_bytes (all ranks). error: what failed, if anything.
    """

    def __init__(self, step: int, skipped: bool, selected: list[list[int]] | None = None, plt: float | None = None):
        self.step, self.skipped, self.selected, self.plt = step, skipped, selected or [], plt
        self.blocked_s = 0.0
        self.persist_s: float | None = None
        self.copy_wait_s = 0.0  # of persist_s: waiting for the snapshot's device-to-host copies
        self.bytes_written = 0
        self.total_bytes: int | None = None
        self.path: Path | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        if skipped:
            self._done.set()

    def done(self) -> bool:
        """True once this rank's persist finished (rank 0: committed or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `done()` (local, not collective); False on timeout."""
        return self._done.wait(timeout)


@dataclass
class Job:
    """Everything the persist thread needs; the main thread does not touch it afterwards."""

    step: int
    tmp: Path
    final: Path
    host: dict[str, torch.Tensor]  # key -> host copy
    records: dict[str, dict[str, Any]]  # key -> {name, shape, dtype[, layer, expert]}
    manifest: dict[str, Any] | None  # rank 0: everything but "files"
    handle: SaveHandle
    t0: float
    abandon_from: int  # committed checkpoints at >= this step are moved aside (an abandoned timeline)
    copies: list[torch.cuda.Event] = field(default_factory=list)  # `host` is valid once these completed


class Persister:
    """Runs the persist of one job at a time for one rank (see the module docstring for the protocol)."""

    def __init__(self, root: Path, rank: int, world_size: int, keep: int, commit_timeout_s: float):
        self.root, self.rank, self.world_size = root, rank, world_size
        self.keep, self.commit_timeout_s = keep, commit_timeout_s

    def run(self, job: Job) -> None:
        """Write this rank's shard and part file; on rank 0 also commit. Errors go to `job.handle.error`."""
        handle = job.handle
        try:
            t_copy = time.perf_counter()
            for event in job.copies:  # the snapshot's CUDA copies may still be writing `host`
                event.synchronize()
            handle.copy_wait_s = time.perf_counter() - t_copy
            job.tmp.mkdir(parents=True, exist_ok=True)
            files = {}
            if job.host:
                for name, rec in write_shards(job.tmp, self.rank, job.host).items():
                    keys = rec.pop("keys")
                    files[name] = {"rank": self.rank, **rec, "tensors": {k: job.records[k] for k in keys}}
                    handle.bytes_written += rec["bytes"]
            write_json_atomic(job.tmp / part_name(self.rank), {"rank": self.rank, "files": files})
            if self.rank == 0:
                self._commit(job)
        except BaseException as e:  # reported to the main thread at the next save / wait
            handle.error = e
            if self.rank != 0:
                _write_error_marker(job.tmp, self.rank, e)
        finally:
            handle.persist_s = time.perf_counter() - job.t0
            handle._done.set()

    def _commit(self, job: Job) -> None:
        files = self._gather_parts(job.tmp)
        manifest = {**job.manifest, "files": files, "bytes": sum(f["bytes"] for f in files.values())}
        problem = structure_problem(manifest)  # e.g. ranks that chose different experts: never commit it
        if problem:
            raise CheckpointError(f"{job.tmp}: not committed, the ranks' shards do not match the manifest ({problem})")
        write_json_atomic(job.tmp / MANIFEST, manifest)
        for r in range(self.world_size):
            (job.tmp / part_name(r)).unlink()
        self._abandon_from(job.abandon_from)
        commit_dir(job.tmp, job.final)
        write_latest(self.root, job.final.name)
        job.handle.path, job.handle.total_bytes = job.final, manifest["bytes"]
        plt = "n/a" if manifest["plt"] is None else f"{100 * manifest['plt']:.2f}%"
        held = sum(len(s) for s in manifest["pec"]["selected"])
        log.info("checkpoint %s committed: %d bytes, %d experts held, PLT %s", job.final, manifest["bytes"], held, plt)
        self._retain()

    def _gather_parts(self, tmp: Path) -> dict[str, Any]:
        """Wait for every rank's part file (written after its shard is fsynced); merge their file records."""
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            for r in range(self.world_size):
                marker = tmp / f"rank-{r:05d}.error"
                if marker.exists():
                    raise CheckpointError(f"rank {r} failed to write its shard: {marker.read_text()}")
            missing = [r for r in range(self.world_size) if not (tmp / part_name(r)).exists()]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"ranks {missing} did not write their shards into {tmp} within "
                                      f"{self.commit_timeout_s} s (checkpoint.commit_timeout_s)")
            time.sleep(_POLL_S)
        files: dict[str, Any] = {}
        for r in range(self.world_size):
            files.update(json.loads((tmp / part_name(r)).read_text())["files"])
        return files

    def _abandon_from(self, step: int) -> None:
        """Checkpoints at >= step belong to a timeline a resume from an older step left: move them aside
        (the first commit after a resume from step S passes S + 1, later commits their own step)."""
        committed = list_committed(self.root)
        newer = [p for s, p in committed if s >= step]
        if not newer:
            return
        if read_latest(self.root) in {p.name for p in newer}:  # never let `latest` dangle
            older = [p for s, p in committed if s < step]
            write_latest(self.root, older[-1].name if older else None)
        for path in newer:
            dest = move_aside(path, secrets.token_hex(4))
            log.warning("checkpoint %s belongs to an abandoned timeline; moved to %s", path, dest)

    def _retain(self) -> None:
        """Delete committed checkpoints beyond the newest `keep`, except those a kept one needs (PEC) and `latest`."""
        committed = list_committed(self.root)
        kept = committed[-self.keep:]
        needed = {p.name for _, p in kept} | {read_latest(self.root)}
        for _, path in kept:
            try:
                steps = Checkpoint.open(path).manifest["pec"]["state"]["copy_step"]
            except (CheckpointError, KeyError) as e:
                log.warning("retention skipped: cannot read %s (%s)", path, e)
                return
            needed |= {step_dir_name(s) for row in steps for s in row if s >= 0}
        for _, path in committed:
            if path.name not in needed:
                remove_dir(path)


def _write_error_marker(tmp: Path, rank: int, error: BaseException) -> None:
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / f"rank-{rank:05d}.error").write_text(f"{type(error).__name__}: {error}")
    except OSError:
        pass
