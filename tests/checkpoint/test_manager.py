import logging
import threading

import numpy as np
import pytest
import torch

from moestack.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, ExpertShard
from moestack.checkpoint import persist
from moestack.checkpoint.storage import MANIFEST, Checkpoint, list_committed, read_latest

from tests.checkpoint.helpers import NUM_EXPERTS, check_experts, make_state


def _save_steps(mgr, steps, tokens=None):
    handles = []
    for step in steps:
        tensors, experts = make_state(step)
        handles.append(mgr.save(step, tensors, experts, {"step": step}, tokens))
        mgr.wait()
    return handles


def _steps(tmp_path):
    return [s for s, _ in list_committed(tmp_path / "ckpt")]


def test_round_trip_restores_every_tensor_exactly(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(7)
    handle = mgr.save(7, tensors, experts, {"step": 7, "note": "x"})
    mgr.wait()
    assert handle.path == tmp_path / "ckpt" / "step-00000007" and handle.total_bytes > 0
    loaded, meta, report = mgr.load(experts_wanted=experts)
    mgr.close()
    assert meta == {"step": 7, "note": "x"} and report.step == 7 and report.stale_experts == 0
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    assert read_latest(tmp_path / "ckpt") == "step-00000007"


def test_save_returns_a_consistent_snapshot(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(1)
    mgr.save(1, tensors, experts, {})
    for t in tensors.values():  # training goes on and updates in place while the persist runs
        t.zero_()
    mgr.wait()
    loaded, _, _ = mgr.load()
    assert torch.equal(loaded["model.embed.weight"], torch.full((16, 8), 1.0))
    check_experts(loaded, [[1] * NUM_EXPERTS] * 2)


def test_host_buffers_are_reused(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=1))
    _save_steps(mgr, [1])
    first = mgr._snap.pool.nbytes
    ptrs = {b.data_ptr() for bufs in mgr._snap.pool._free.values() for b in bufs}
    _save_steps(mgr, [2, 3])
    assert mgr._snap.pool.nbytes == first
    assert {b.data_ptr() for bufs in mgr._snap.pool._free.values() for b in bufs} == ptrs


def test_pec_recovery_takes_newest_copy_of_each_expert(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=10))
    handles = _save_steps(mgr, [1, 2, 3, 4])
    assert [h.selected[0] for h in handles] == [list(range(8)), [0, 1], [2, 3], [4, 5]]
    loaded, _, report = CheckpointManager(tmp_path, CheckpointConfig()).load()
    sources = [[2, 2, 3, 3, 4, 4, 1, 1]] * 2
    assert report.step == 4 and report.expert_sources == sources and report.stale_experts == 12
    check_experts(loaded, sources)
    assert torch.equal(loaded["model.embed.weight"], torch.full((16, 8), 4.0))  # non-expert: always newest


def test_pec_checkpoint_is_smaller(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=10))
    full, partial = _save_steps(mgr, [1, 2])
    assert partial.total_bytes < 0.6 * full.total_bytes


def test_plt_recorded_and_reported_hand_example(tmp_path):
    # 1 MoE layer, 4 experts, K = 1 sequential: the example of test_pec, through the manager
    cfg = CheckpointConfig(pec_k=1)
    mgr = CheckpointManager(tmp_path, cfg)
    tensors, experts = make_state(0, ids=range(4), layers=1)
    for step, tok in [(1, [10, 20, 30, 40]), (2, [10, 20, 30, 40]), (3, [5, 5, 5, 5])]:
        mgr.save(step, tensors, experts, {"step": step}, torch.tensor([tok]))
        mgr.wait()
    plts = [Checkpoint.open(p).manifest["plt"] for _, p in list_committed(tmp_path / "ckpt")]
    assert plts == pytest.approx([0.0, 90 / 200, 85 / 220])
    mgr2 = CheckpointManager(tmp_path, cfg)  # a restart after a failure at step 3
    _, _, report = mgr2.load(experts_wanted=experts)
    assert report.lost_tokens == 85 and report.total_tokens == 220 and report.plt == pytest.approx(85 / 220)
    h = mgr2.save(4, tensors, experts, {}, torch.tensor([[10, 10, 10, 10]]))
    mgr2.close()
    assert h.selected == [[2]] and h.plt == pytest.approx(115 / 260)


def test_adaptive_k_raises_k_to_meet_threshold(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=1, plt_threshold=0.2, keep=5))
    tokens = torch.full((2, NUM_EXPERTS), 10)
    h1, h2 = _save_steps(mgr, [1, 2], tokens)
    mgr.close()
    # 16 experts x 10 unsaved of 320 processed; (8 - k) * 20 / 320 <= 0.2 needs k >= 5
    assert [len(s) for s in h2.selected] == [5, 5] and h2.plt <= 0.2
    assert Checkpoint.open(h2.path).manifest["pec"]["k"] == 5


def test_load_aware_follows_the_tokens(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, pec_policy="load_aware", keep=5))
    tokens = torch.tensor([[1, 1, 9, 1, 1, 1, 8, 1], [5, 1, 1, 1, 1, 1, 1, 7]])
    h1, h2 = _save_steps(mgr, [1, 2], tokens)
    mgr.close()
    assert h2.selected == [[2, 6], [0, 7]]


def test_resume_continues_pec_round_robin(tmp_path):
    cfg = CheckpointConfig(pec_k=4, keep=10)
    _save_steps(CheckpointManager(tmp_path, cfg), [1, 2])  # full, then experts 0-3
    mgr = CheckpointManager(tmp_path, cfg)
    mgr.load()
    (h,) = _save_steps(mgr, [3])
    assert h.selected == [[4, 5, 6, 7]] * 2  # not a full checkpoint again: the chain continues


def test_fallback_to_previous_good_checkpoint(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    _save_steps(mgr, [1, 2, 3])
    root = tmp_path / "ckpt"
    shard = root / "step-00000003" / "rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    manifest = root / "step-00000002" / MANIFEST
    manifest.write_text(manifest.read_text()[:50])
    with caplog.at_level(logging.WARNING, logger="moestack.checkpoint"):
        assert mgr.latest_good() == root / "step-00000001"
        loaded, meta, report = mgr.load()
    assert meta["step"] == 1 and report.step == 1 and len(report.skipped) == 2
    assert str(shard) in caplog.text and str(manifest) in caplog.text
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        mgr.load(path=root / "step-00000003")
    (root / "step-00000001" / "rank-00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        mgr.load()
    assert mgr.latest_good() is None


def test_pec_falls_back_to_older_copy_of_a_corrupt_expert(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=4, keep=10))
    _save_steps(mgr, [1, 2, 3, 4])  # 1 full, 2: 0-3, 3: 4-7, 4: 0-3
    (tmp_path / "ckpt" / "step-00000003" / "rank-00000.safetensors").unlink()
    loaded, _, report = mgr.load()
    assert report.step == 4 and report.expert_sources[0] == [4, 4, 4, 4, 1, 1, 1, 1]
    check_experts(loaded, report.expert_sources)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    assert mgr.latest_good() is None
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        mgr.load()


def test_retention_keeps_what_pec_recovery_needs(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=1))
    _save_steps(mgr, [1, 2, 3, 4, 5, 6])  # 1 full; 2: 0,1  3: 2,3  4: 4,5  5: 6,7  6: 0,1
    assert _steps(tmp_path) == [3, 4, 5, 6]
    loaded, _, report = mgr.load()
    check_experts(loaded, report.expert_sources)
    assert report.expert_sources[0] == [6, 6, 3, 3, 4, 4, 5, 5]


def test_retention_full_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=2))
    _save_steps(mgr, [1, 2, 3, 4])
    assert _steps(tmp_path) == [3, 4]


def test_resume_from_older_step_moves_newer_aside(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    _save_steps(mgr, [1, 2, 3])
    root = tmp_path / "ckpt"
    mgr.load(path=root / "step-00000001")
    _save_steps(mgr, [2])
    assert _steps(tmp_path) == [1, 2] and read_latest(root) == "step-00000002"
    assert len(list((root / "abandoned").iterdir())) == 2


def gate_writes(monkeypatch) -> threading.Event:
    """Make every shard write wait (up to 10 s) until the returned event is set."""
    gate = threading.Event()
    real = persist.write_shards

    def slow_write(directory, rank, tensors):
        gate.wait(10)
        return real(directory, rank, tensors)

    monkeypatch.setattr(persist, "write_shards", slow_write)
    return gate


def test_when_busy_skip_and_wait(tmp_path, monkeypatch, caplog):
    gate = gate_writes(monkeypatch)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(when_busy="skip", pec_k=2, keep=5))
    tensors, experts = make_state(1)
    tok = torch.ones(2, NUM_EXPERTS, dtype=torch.int64)
    h1 = mgr.save(1, tensors, experts, {}, tok)
    with caplog.at_level(logging.WARNING, logger="moestack.checkpoint"):
        h2 = mgr.save(2, tensors, experts, {}, tok)
    assert not h1.done() and h2.skipped and "skipped" in caplog.text
    gate.set()
    mgr.wait()
    h3 = mgr.save(3, tensors, experts, {}, tok)
    mgr.wait()
    assert _steps(tmp_path) == [1, 3]
    assert h3.plt == pytest.approx(24 / 48)  # 12 experts x 2 unsaved tokens: the skipped interval counts

    gate.clear()
    waiting = CheckpointManager(tmp_path / "w", CheckpointConfig(when_busy="wait"))
    waiting.save(1, tensors, experts, {})
    threading.Timer(0.3, gate.set).start()
    h = waiting.save(2, tensors, experts, {})
    waiting.close()
    assert not h.skipped and h.blocked_s >= 0.25


def test_when_busy_defer_takes_the_checkpoint_once_the_write_is_done(tmp_path, monkeypatch, caplog):
    gate = gate_writes(monkeypatch)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(every=10, when_busy="defer", keep=5))
    tensors, experts = make_state(1)
    assert mgr.save(10, tensors, experts, {}).step == 10 and mgr.deferred is None
    with caplog.at_level(logging.INFO, logger="moestack.checkpoint"):
        assert mgr.due(20) and mgr.save(20, tensors, experts, {}).skipped  # step 10 still writing
    assert mgr.deferred == 20 and "deferred" in caplog.text
    assert mgr.due(21) and mgr.save(21, tensors, experts, {}).skipped and mgr.deferred == 20  # still owed
    gate.set()
    mgr._thread.join()
    h = mgr.save(22, tensors, experts, {})  # the first step that finds the write done
    assert not h.skipped and mgr.deferred is None and not mgr.due(23)
    mgr._thread.join()
    gate.clear()
    mgr.save(25, tensors, experts, {})  # its write waits for the gate
    threading.Timer(0.3, gate.set).start()
    final = mgr.save(30, tensors, experts, {}, full=True)  # the last checkpoint waits, whatever the policy
    mgr.close()
    assert not final.skipped and final.blocked_s >= 0.25 and _steps(tmp_path) == [10, 22, 25, 30]


def test_failed_persist_raises_and_keeps_previous(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=4, keep=5))
    _save_steps(mgr, [1, 2])  # 1 full, 2: experts 0-3
    real = persist.write_shards
    monkeypatch.setattr(persist, "write_shards", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    tensors, experts = make_state(3)
    mgr.save(3, tensors, experts, {})
    with pytest.raises(CheckpointError, match="disk full"):
        mgr.wait()
    monkeypatch.setattr(persist, "write_shards", real)
    (h,) = _save_steps(mgr, [4])
    assert h.selected[0] == [4, 5, 6, 7]  # step 3 never landed, so 4-7 are still the oldest copies
    assert _steps(tmp_path) == [1, 2, 4]


def test_synchronous_mode_commits_inside_save(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=False))
    tensors, experts = make_state(1)
    h = mgr.save(1, tensors, experts, {})
    assert h.done() and h.path is not None and _steps(tmp_path) == [1]


def test_resharding_on_one_process(tmp_path):
    """Two EP ranks' layouts read from a single-rank checkpoint, and back."""
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    _save_steps(mgr, [5])
    for rank in range(2):
        ids = tuple(range(4 * rank, 4 * rank + 4))
        _, experts = make_state(5, ids=ids)
        loaded, _, _ = mgr.load(experts_wanted=experts)
        assert loaded["model.layers.0.moe.experts.w1"].shape == (4, 4, 6)
        check_experts(loaded, [[5] * 8] * 2, ids=ids)
    with pytest.raises(CheckpointError, match="out of range"):
        mgr.load(experts_wanted={"model.layers.0.moe.experts.w1": ExpertShard(0, (9,))})


def test_bad_inputs_fail_early(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(1)
    with pytest.raises(ValueError, match="dim 0"):
        mgr.save(1, tensors, {**experts, "model.embed.weight": ExpertShard(0, (0, 1))}, {})
    with pytest.raises(TypeError):
        mgr.save(1, tensors, experts, {"t": torch.zeros(1)})  # meta is JSON, never pickle
    with pytest.raises(ValueError, match="expert_tokens"):
        mgr.save(1, tensors, experts, {}, torch.zeros(3, 3, dtype=torch.int64))
    h = mgr.save(1, tensors, experts, {}, torch.ones(2, NUM_EXPERTS, dtype=torch.int64))
    mgr.close()
    assert h.path is not None and np.all(mgr._pec.processed == 1)  # the failed calls counted nothing


def test_a_reader_leaves_the_save_in_flight_alone(tmp_path, monkeypatch):
    gate = gate_writes(monkeypatch)
    writer = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    gate.set()
    _save_steps(writer, [1])
    gate.clear()
    tensors, experts = make_state(2)
    writer.save(2, tensors, experts, {})  # its shard write waits for the gate
    root = tmp_path / "ckpt"
    while not any(p.name.startswith(".tmp-") for p in root.iterdir()):
        threading.Event().wait(0.01)
    reader = CheckpointManager(tmp_path, CheckpointConfig())  # eval / generate on a run in progress
    _, meta, _ = reader.load()
    assert meta == {"step": 1} and any(p.name.startswith(".tmp-") for p in root.iterdir())
    gate.set()
    writer.close()
    assert _steps(tmp_path) == [1, 2]


def test_a_saving_manager_removes_leftovers_of_killed_saves(tmp_path):
    (tmp_path / "ckpt" / ".tmp-step-00000009-dead-1").mkdir(parents=True)
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    assert (tmp_path / "ckpt" / ".tmp-step-00000009-dead-1").exists()  # creating a manager deletes nothing
    _save_steps(mgr, [1])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000001"]


@pytest.mark.parametrize("step", [-5, 2.0, "3", True])
def test_a_bad_step_is_refused_before_anything_changes(tmp_path, step):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=5))
    _save_steps(mgr, [1])
    tensors, experts = make_state(2)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        mgr.save(step, tensors, experts, {})
    (h,) = _save_steps(mgr, [2])
    assert h.selected[0] == [0, 1] and _steps(tmp_path) == [1, 2]  # PEC state untouched by the refusal


def test_resume_from_an_older_step_never_mixes_in_the_timeline_it_left(tmp_path):
    cfg = CheckpointConfig(pec_k=2, keep=10)
    _save_steps(CheckpointManager(tmp_path, cfg), [10, 20, 30])  # 10 full; 20: 0,1; 30: 2,3
    mgr = CheckpointManager(tmp_path, cfg)
    mgr.load(path=tmp_path / "ckpt" / "step-00000010")
    (h,) = _save_steps(mgr, [25])  # the new timeline: 20 and 30 belong to the old one
    assert h.selected[0] == [0, 1] and _steps(tmp_path) == [10, 25]
    loaded, _, report = CheckpointManager(tmp_path, cfg).load()
    assert report.step == 25 and report.expert_sources[0] == [25, 25, 10, 10, 10, 10, 10, 10]
    check_experts(loaded, report.expert_sources)


def test_recovery_never_takes_a_copy_newer_than_the_target_timeline_made(tmp_path):
    """Even with the old timeline's checkpoints still on disk (a crash before the move-aside finished)."""
    _save_steps(CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=10)), [10, 15, 20])  # 15: 0,1; 20: 2,3
    cfg = CheckpointConfig(pec_k=1, keep=10)
    mgr = CheckpointManager(tmp_path, cfg)
    mgr.load(path=tmp_path / "ckpt" / "step-00000015")
    mgr._resumed_step = None  # as if the abandoned step 20 had not been moved aside
    (h,) = _save_steps(mgr, [25])
    assert h.selected[0] == [2] and _steps(tmp_path) == [10, 15, 20, 25]
    loaded, _, report = CheckpointManager(tmp_path, cfg).load()
    assert report.expert_sources[0] == [15, 15, 25, 10, 10, 10, 10, 10]  # expert 3 not from step 20
    check_experts(loaded, report.expert_sources)


def test_synchronous_mode_raises_a_failed_save_at_once(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=False))
    _save_steps(mgr, [1])
    monkeypatch.setattr(persist, "write_shards", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    tensors, experts = make_state(2)
    with pytest.raises(CheckpointError, match="disk full"):
        mgr.save(2, tensors, experts, {})
    assert _steps(tmp_path) == [1]


def test_a_dtype_safetensors_cannot_hold_is_refused_inside_save(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    tensors, experts = make_state(1)
    with pytest.raises(CheckpointError, match="complex64"):
        mgr.save(1, {**tensors, "rope": torch.zeros(2, dtype=torch.complex64)}, experts, {})
    assert mgr._thread is None and _steps(tmp_path) == []


@pytest.mark.parametrize("damage", ["state_empty", "state_short", "experts_no_shape", "selected_str"])
def test_a_damaged_manifest_field_is_named_and_load_falls_back(tmp_path, damage):
    """Damage inside a well-formed JSON manifest: verify names it, load takes the older checkpoint."""
    import json

    from moestack.checkpoint import verify

    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5, pec_k=2))
    _save_steps(mgr, [1, 2])
    path = tmp_path / "ckpt" / "step-00000002" / MANIFEST
    m = json.loads(path.read_text())
    if damage == "state_empty":
        m["pec"]["state"] = {}
    elif damage == "state_short":
        m["pec"]["state"]["copy_step"] = m["pec"]["state"]["copy_step"][:1]
    elif damage == "experts_no_shape":
        for info in m["experts"].values():
            info.pop("shape")
    else:
        m["pec"]["selected"][0] = "01"
    path.write_text(json.dumps(m))
    problems = verify(path.parent)
    assert len(problems) == 1 and "damaged manifest" in problems[0] and str(path) in problems[0]
    _, meta, report = CheckpointManager(tmp_path, CheckpointConfig()).load()
    assert meta["step"] == 1 and len(report.skipped) == 1


def test_saving_again_at_a_committed_step_keeps_every_expert(tmp_path):
    """A second save at step N moves the first step-N aside, so experts whose newest copy was there are
    saved again: the new checkpoint never depends on one it replaced."""
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=5))
    first, second = _save_steps(mgr, [10, 10])
    assert first.selected[0] == list(range(NUM_EXPERTS)) and second.selected[0] == list(range(NUM_EXPERTS))
    loaded, _, report = CheckpointManager(tmp_path, CheckpointConfig()).load()
    assert report.step == 10 and report.stale_experts == 0
    check_experts(loaded, report.expert_sources)
