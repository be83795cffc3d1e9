"""Two real ranks on gloo: fully sharded saves, PEC, and resharding ep 1 -> 2 and 2 -> 1."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moestack.checkpoint import CheckpointConfig, CheckpointManager, verify
from moestack.checkpoint.storage import MANIFEST, list_committed

from tests.checkpoint.helpers import NUM_EXPERTS, check_experts, make_state

WORLD = 2


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        _load_one_rank_checkpoint_on_two(rank, tmp, group)
        _save_expert_parallel(rank, tmp, group)
        _save_data_parallel(rank, tmp, group)
        _ranks_that_disagree_never_commit(rank, tmp, group)
    finally:
        dist.destroy_process_group()


def _ranks_that_disagree_never_commit(rank, tmp, group):
    """Ranks passing different token counts (a caller bug: the trainer sums them) choose different experts;
    the manifest would list experts no rank wrote, so the save fails on every rank and `latest` stays."""
    import pytest

    from moestack.checkpoint import CheckpointError
    from moestack.checkpoint.storage import read_latest

    mgr = CheckpointManager(f"{tmp}/disagree", CheckpointConfig(pec_k=2, pec_policy="load_aware", keep=5), group=group)
    ids = _ep_ids(rank)
    tensors, experts = make_state(1, ids=ids)
    mgr.save(1, tensors, experts, {"step": 1})  # the first checkpoint holds every expert
    mgr.wait()
    tokens = torch.zeros(2, NUM_EXPERTS, dtype=torch.int64)
    tokens[:, [e for e in range(NUM_EXPERTS) if e not in ids]] = 5  # each rank's own, unsummed view
    tensors, experts = make_state(2, ids=ids)
    with pytest.raises(CheckpointError, match="not committed"):
        mgr.save(2, tensors, experts, {"step": 2}, tokens)
        mgr.wait()
    assert read_latest(mgr.root) == "step-00000001"
    mgr.close()


def _ep_ids(rank: int) -> range:
    per = NUM_EXPERTS // WORLD
    return range(rank * per, (rank + 1) * per)


def _load_one_rank_checkpoint_on_two(rank, tmp, group):
    """1 -> 2: each rank reads its half of the experts of a single-process checkpoint."""
    mgr = CheckpointManager(f"{tmp}/one", CheckpointConfig(), group=group)
    _, experts = make_state(0, ids=_ep_ids(rank))
    loaded, meta, report = mgr.load(experts_wanted=experts)
    mgr.close()
    assert meta == {"step": 4} and loaded["model.layers.1.moe.experts.w2"].shape == (4, 4, 6)
    check_experts(loaded, [[4] * NUM_EXPERTS] * 2, ids=_ep_ids(rank))


def _save_expert_parallel(rank, tmp, group):
    """ep = 2 with PEC (K = 2): each rank writes its own experts; then 2 -> 2 recovery."""
    mgr = CheckpointManager(f"{tmp}/ep", CheckpointConfig(pec_k=2, keep=10), group=group)
    for step in (1, 2, 3):
        tensors, experts = make_state(step, ids=_ep_ids(rank))
        tensors["rng.rank0.torch"] = torch.full((4,), rank, dtype=torch.uint8)  # per-rank: rank in name
        tensors[f"rng.rank{rank}.torch"] = tensors.pop("rng.rank0.torch")
        mgr.save(step, tensors, experts, {"step": step}, torch.ones(2, NUM_EXPERTS, dtype=torch.int64))
    mgr.wait()
    loaded, _, report = mgr.load(experts_wanted=experts)
    mgr.close()
    assert report.expert_sources[0] == [2, 2, 3, 3, 1, 1, 1, 1]
    check_experts(loaded, report.expert_sources, ids=_ep_ids(rank))
    assert torch.equal(loaded["rng.rank1.torch"], torch.ones(4, dtype=torch.uint8))


def _save_data_parallel(rank, tmp, group):
    """Pure DP: both ranks hold the same full state; each tensor is written once, bytes balanced."""
    mgr = CheckpointManager(f"{tmp}/dp", CheckpointConfig(), group=group)
    tensors, experts = make_state(9, dense=(64, 32), expert_shape=(16, 32))
    mgr.save(9, tensors, experts, {"step": 9})
    mgr.close()


def test_sharded_save_and_reshard(tmp_path):
    one = CheckpointManager(tmp_path / "one", CheckpointConfig())
    tensors, experts = make_state(4)
    one.save(4, tensors, experts, {"step": 4})
    one.close()

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    # ep = 2 checkpoints: two shard files, each expert slice written by the rank that holds it, once
    ep_root = tmp_path / "ep" / "ckpt"
    assert [s for s, _ in list_committed(ep_root)] == [1, 2, 3]
    for _, path in list_committed(ep_root):
        assert verify(path) == []
        m = json.loads((path / MANIFEST).read_text())
        assert m["world_size"] == 2 and sorted(m["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
        for fname, rec in m["files"].items():
            for key, info in rec["tensors"].items():
                if "expert" in info:
                    assert info["expert"] // 4 == rec["rank"], (key, fname)
        keys = [k for rec in m["files"].values() for k in rec["tensors"]]
        assert len(keys) == len(set(keys))

    # 2 -> 1: one process reads the ep = 2 PEC chain, all experts in global order
    loaded, meta, report = CheckpointManager(tmp_path / "ep", CheckpointConfig()).load()
    assert meta == {"step": 3} and loaded["model.layers.0.moe.experts.w1"].shape == (8, 4, 6)
    check_experts(loaded, report.expert_sources)
    assert {"rng.rank0.torch", "rng.rank1.torch"} <= loaded.keys()

    # dp replicas: every tensor once in total, bytes split evenly
    (_, dp_path), = list_committed(tmp_path / "dp" / "ckpt")
    m = json.loads((dp_path / MANIFEST).read_text())
    keys = [k for rec in m["files"].values() for k in rec["tensors"]]
    assert len(keys) == len(set(keys)) == len(make_state(0)[0]) - 12 + 12 * NUM_EXPERTS
    sizes = [rec["bytes"] for rec in m["files"].values()]
    assert len(sizes) == 2 and max(sizes) / min(sizes) < 1.05, sizes
    loaded, _, _ = CheckpointManager(tmp_path / "dp", CheckpointConfig()).load()
    assert torch.equal(loaded["model.embed.weight"], torch.full((64, 32), 9.0))
