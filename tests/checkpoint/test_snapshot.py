"""Level 1: the snapshot is consistent, and on CUDA overlaps training until `wait_snapshot`."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from moestack.checkpoint import CheckpointConfig, CheckpointManager
from moestack.checkpoint.persist import Job, Persister, SaveHandle
from moestack.checkpoint.snapshot import Snapshotter
from moestack.checkpoint.storage import shard_name

from tests.checkpoint.helpers import make_state


class SlowCopy:
    """Stands in for a CUDA event: the copy into `buf` lands only when someone waits for it."""

    def __init__(self, buf: torch.Tensor | None = None, value: float = 0.0, delay_s: float = 0.0):
        self.buf, self.value, self.delay_s = buf, value, delay_s
        self.waited = threading.Event()

    def synchronize(self) -> None:
        time.sleep(self.delay_s)
        if self.buf is not None and not self.waited.is_set():
            self.buf.fill_(self.value)
        self.waited.set()


def _clones(tensors):
    return {k: t.detach().cpu().clone() for k, t in tensors.items()}


def _assert_loaded_equal(loaded, want):
    assert loaded.keys() == want.keys()
    for k, t in want.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k


# ---------------------------------------------------------------------------- CPU


def test_cpu_snapshot_is_complete_on_return():
    snap = Snapshotter(pin=False)
    tensors, _ = make_state(3)
    want = _clones(tensors)
    host = snap.snapshot(tensors)
    assert snap.pending() == [] and snap.wait() == 0.0
    for t in tensors.values():
        t.zero_()
    _assert_loaded_equal(host, want)


def test_state_mutated_right_after_save_is_saved_with_pre_mutation_values(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(5)
    want = _clones(tensors)
    h = mgr.save(5, tensors, experts, {})
    blocked = h.blocked_s
    for t in tensors.values():  # the optimizer step of the next training step
        t.add_(1)
    assert mgr.wait_snapshot() == 0.0  # CPU: nothing was in flight
    mgr.wait()
    loaded, _, _ = mgr.load(experts_wanted=experts)
    mgr.close()
    _assert_loaded_equal(loaded, want)
    assert h.blocked_s == blocked


def test_wait_snapshot_with_nothing_in_flight_is_free_and_repeatable(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    assert mgr.wait_snapshot() == 0.0 and mgr.wait_snapshot() == 0.0
    tensors, experts = make_state(1)
    mgr.save(1, tensors, experts, {})
    assert mgr.wait_snapshot() == 0.0 and mgr.wait_snapshot() == 0.0
    mgr.close()
    assert mgr.wait_snapshot() == 0.0


def test_wait_snapshot_adds_the_wait_to_blocked_s_once(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(1)
    h1 = mgr.save(1, tensors, experts, {})
    saved = h1.blocked_s
    monkeypatch.setattr(mgr._snap, "wait", lambda: 0.5)  # as if each copy ran on for half a second
    assert mgr.wait_snapshot() == 0.5 and h1.blocked_s == pytest.approx(saved + 0.5)
    mgr.wait_snapshot()  # nothing of checkpoint 1 left to wait for
    assert h1.blocked_s == pytest.approx(saved + 0.5)
    h2 = mgr.save(2, tensors, experts, {})
    saved2 = h2.blocked_s
    assert h1.blocked_s == pytest.approx(saved + 0.5) and saved2 < 0.5
    mgr.wait()  # waits for checkpoint 2's copies first
    assert h2.blocked_s == pytest.approx(saved2 + 0.5)
    monkeypatch.undo()
    mgr.close()


def test_persist_waits_for_the_copies_before_reading_the_buffers(tmp_path):
    host = {"w": torch.zeros(64)}
    copy = SlowCopy(host["w"], 7.0, delay_s=0.05)
    handle = SaveHandle(1, skipped=False)
    job = Job(1, tmp_path / ".tmp", tmp_path / "step-1", host, {"w": {"name": "w", "shape": [64], "dtype": "float32"}},
              None, handle, time.perf_counter(), abandon_from=1, copies=[copy])
    thread = threading.Thread(target=Persister(tmp_path, 1, 2, 5, 10).run, args=(job,))  # rank 1: no commit
    thread.start()
    thread.join()
    assert handle.error is None and copy.waited.is_set()
    assert torch.equal(load_file(tmp_path / ".tmp" / shard_name(1))["w"], torch.full((64,), 7.0))


def test_snapshot_never_reuses_a_buffer_still_being_copied_into():
    snap = Snapshotter(pin=False)
    first = snap.snapshot({"w": torch.ones(8)})
    late = SlowCopy(first["w"], 5.0)
    snap._events.append(late)  # the first snapshot's copy is still running
    second = snap.snapshot({"w": torch.full((8,), 2.0)})
    assert late.waited.is_set() and second["w"].data_ptr() == first["w"].data_ptr()
    assert torch.equal(second["w"], torch.full((8,), 2.0))  # the late copy landed before the reuse


def test_close_waits_for_copies_in_flight(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(1)
    mgr.save(1, tensors, experts, {})
    late = SlowCopy()
    mgr._snap._events.append(late)
    mgr.close()
    assert late.waited.is_set() and mgr._snap.pool.nbytes == 0


# ---------------------------------------------------------------------------- CUDA


def _cuda_state(step: int):
    tensors, experts = make_state(step, expert_shape=(256, 1024))  # ~8 MiB of experts per tensor
    tensors = {k: t if k.startswith("rng.") else t.cuda() for k, t in tensors.items()}
    tensors["model.big"] = torch.full((64, 2**20), float(step), device="cuda")  # 256 MiB
    return tensors, experts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshot_overlaps_and_keeps_pre_mutation_values(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = _cuda_state(4)
    want = _clones(tensors)
    mgr.save(3, tensors, experts, {})  # warm-up: allocates the pinned buffers
    mgr.wait()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s: the training stream is busy, the copy cannot have run yet
    h = mgr.save(4, tensors, experts, {})
    saved = h.blocked_s
    assert any(not e.query() for e in mgr._snap.pending())  # save returned with the copy in flight
    waited = mgr.wait_snapshot()
    assert waited > 0 and h.blocked_s == pytest.approx(saved + waited)
    assert mgr.wait_snapshot() == 0.0 and h.blocked_s == pytest.approx(saved + waited)
    for t in tensors.values():  # the optimizer step
        t.add_(1)
    mgr.wait()
    loaded, _, _ = mgr.load(experts_wanted=experts)
    mgr.close()
    _assert_loaded_equal(loaded, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_next_save_charges_an_unfinished_copy_to_the_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    tensors, experts = _cuda_state(1)
    want = _clones(tensors)
    mgr.save(1, tensors, experts, {})  # warm-up: allocates the pinned buffers
    mgr.wait()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s before the copy can start
    h2 = mgr.save(2, tensors, experts, {})
    saved = h2.blocked_s
    h3 = mgr.save(3, tensors, experts, {})  # no wait_snapshot in between: save waits for the copy first
    assert h2.blocked_s > saved + 0.05
    loaded, _, _ = mgr.load(experts_wanted=experts)
    mgr.close()
    assert not h3.skipped and h3.path is not None
    _assert_loaded_equal(loaded, want)
