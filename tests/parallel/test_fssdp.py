"""FSSDP (Hecate): plans, the sharded layer against one process (gloo, 2 and 4 ranks), re-sharding, and
training and checkpoints under torchrun against a single process and EP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moestack.cli import main
from moestack.config import Config, ConfigError, ParallelConfig
from moestack.moe.layer import MoELayer
from moestack.parallel.fssdp import FSSDP, ShardedExperts
from moestack.parallel.fssdp_plan import balance, device_loads, heterogeneous_sharding, materialize
from moestack.parallel.mesh import init_parallel, shutdown
from tests.dist import run_ranks
from tests.test_train import TINY, losses

E, D, F, K, T = 8, 16, 24, 2, 12


# ---- plans ------------------------------------------------------------------------------------------
def test_heterogeneous_sharding_balances_slots_and_spreads_hot_experts():
    loads = np.array([[100, 90, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5, 5, 5], [1, 1, 1, 1, 1, 1, 50, 60]])
    owner = heterogeneous_sharding(loads, 4)
    slots = np.bincount(owner.flatten(), minlength=4)
    assert slots.max() - slots.min() <= 1 and slots.sum() == 24  # memory balanced over all layers
    assert owner[0, 0] != owner[0, 1] and owner[2, 6] != owner[2, 7]  # the hot pair of a layer is split
    # any world size: 3 ranks over 8 experts x 3 layers, slots ceil(24 / 3) = 8 each
    assert np.bincount(heterogeneous_sharding(loads, 3).flatten()).tolist() == [8, 8, 8]


def test_materialize_copies_the_hottest_expert_within_the_budget_and_lowers_the_max():
    loads = np.array([80.0, 10, 5, 5, 5, 5, 5, 5])
    owner = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    before = device_loads(loads, owner, [[]] * 4, 4)
    reps = materialize(loads, owner, 4, budget=1)
    assert all(len(r) <= 1 for r in reps) and sum(len(r) for r in reps) == 3
    assert all(r == [0] for d, r in enumerate(reps) if r)  # only expert 0 is worth copying
    after = device_loads(loads, owner, reps, 4)
    assert balance(after) < balance(before) and after.sum() == pytest.approx(loads.sum())
    assert materialize(loads, owner, 4, budget=0) == [[], [], [], []]
    assert materialize(np.ones(8), owner, 4, budget=2) == [[], [], [], []]  # balanced: nothing pays


def test_fssdp_config_errors_are_clear():
    with pytest.raises(ConfigError, match="parallel.mode='zz' is not one of ep, fssdp"):
        ParallelConfig(mode="zz").validate()
    with pytest.raises(ConfigError, match="fssdp_window must be >= 1"):
        ParallelConfig(mode="fssdp", fssdp_window=0).validate()
    with pytest.raises(ConfigError, match="train.compile is not supported with parallel.mode=fssdp"):
        from dataclasses import replace
        cfg = Config()
        replace(cfg, parallel=replace(cfg.parallel, mode="fssdp"), train=replace(cfg.train, compile=True)).validate()


# ---- the layer on real processes ------------------------------------------------------------------
def _layer() -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, K, F, aux_loss_coef=0.01, z_loss_coef=0.0)
    with torch.no_grad():  # skewed routing: experts 0 and 1 win most choices
        layer.router.gate.weight[:2, 0] += 3.0
    return layer


def _inputs(world):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=g)
    x[:, 0] = x[:, 0].abs() + 0.5
    return x, torch.randn(world * T, D, generator=g)


class _OneLayer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.block = torch.nn.ModuleDict({"moe": layer})

    def moe_layers(self):
        return [self.block["moe"]]


def _check_layer(rank, world, owner_row, replicas, remat):
    ctx = init_parallel(ParallelConfig(mode="fssdp"), "cpu")
    x_all, g_all = _inputs(world)
    rows = slice(rank * T, (rank + 1) * T)
    ref = _layer()
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * g_all).sum() + aux_ref * world).backward()

    layer = _layer()
    cfg = ParallelConfig(mode="fssdp", fssdp_rematerialize=remat)
    driver = FSSDP(_OneLayer(layer), ctx, cfg, np.array([owner_row]))
    driver.replicas[0] = replicas
    driver._apply(0, layer, replicas)
    assert isinstance(layer.experts, ShardedExperts) and layer.experts.replica_ids == sorted(
        replicas[rank], key=lambda e: (owner_row[e], e))
    x = x_all[rows].clone().requires_grad_()
    layer.experts.start_gather()
    y, aux = layer(x)
    ((y * g_all[rows]).sum() + aux).backward()

    torch.testing.assert_close(y, y_ref[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[rows], atol=1e-5, rtol=1e-5)
    mine = [e for e in range(E) if owner_row[e] == rank]
    assert layer.experts.global_ids == mine
    # each expert's gradient (its copies' summed in by the reverse all-to-all) is on its owner, once:
    # the owners' gradients, summed over ranks by expert, equal the reference's
    full = torch.zeros_like(ref.experts.w13.grad)
    if mine:
        full[torch.tensor(mine)] = layer.experts.w13.grad
        torch.testing.assert_close(layer.experts.w2.grad, ref.experts.w2.grad[torch.tensor(mine)], atol=1e-5, rtol=1e-5)
    dist.all_reduce(full)
    torch.testing.assert_close(full, ref.experts.w13.grad, atol=1e-5, rtol=1e-5)
    copies = sum(len(r) for r in replicas)
    row_bytes = (D * 2 * F + F * D) * 4
    assert layer.experts.bytes["materialized"] == len(replicas[rank]) * row_bytes
    assert layer.experts.bytes["gathered"] == len(replicas[rank]) * row_bytes * (2 if remat else 1)
    assert copies > 0
    shutdown(ctx)


@pytest.mark.parametrize("remat", [False, True], ids=["keep", "rematerialize"])
@pytest.mark.parametrize("world", [2, 4])
def test_fssdp_layer_equals_one_process_with_copies_and_a_rank_owning_nothing(world, remat):
    """Rank 0 owns every hot expert and the last rank owns none; the hot experts are copied to several ranks."""
    if world == 2:
        owner_row, replicas = [0, 0, 0, 0, 0, 1, 1, 1], [[], [0, 1]]
    else:
        owner_row, replicas = [0, 0, 0, 1, 1, 2, 2, 2], [[], [0], [0, 1], [1, 3]]  # rank 3 owns none
    run_ranks(_check_layer, world, owner_row, replicas, remat)


def _check_reshard(rank, world):
    ctx = init_parallel(ParallelConfig(mode="fssdp"), "cpu")
    layer = _layer()
    owner = np.array([[e % world for e in range(E)]])
    driver = FSSDP(_OneLayer(layer), ctx, ParallelConfig(mode="fssdp"), owner)
    ex = layer.experts
    opt = torch.optim.AdamW([ex.w13, ex.w2])
    (ex.w13.sum() + ex.w2.square().sum()).backward()
    opt.step()
    moments = {(p_name, what): {e: (p if what == "w" else opt.state[p][what])[i].detach().clone()
                                for i, e in enumerate(ex.global_ids)}
               for p_name, p in (("w13", ex.w13), ("w2", ex.w2)) for what in ("w", "exp_avg", "exp_avg_sq")}
    gathered = [None] * world
    dist.all_gather_object(gathered, moments)
    new = np.array([[0, 0, 0, 0, 0, 0, world - 1, world - 1]])  # a rank in the middle ends with none
    assert driver.reshard(new, opt) and not driver.reshard(new, opt)
    mine = [e for e in range(E) if new[0, e] == rank]
    assert ex.global_ids == mine and ex.w13.shape[0] == len(mine)
    for i, e in enumerate(mine):
        src = gathered[e % world]  # what the old owner held, bit for bit
        for p_name, p in (("w13", ex.w13), ("w2", ex.w2)):
            assert torch.equal(p[i].detach(), src[(p_name, "w")][e])
            for what in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][what][i], src[(p_name, what)][e])
    assert opt.state[ex.w13]["exp_avg"].shape[0] == len(mine)
    shutdown(ctx)


def test_reshard_moves_weights_and_adam_moments_to_the_new_owners():
    run_ranks(_check_reshard, 4)


# ---- training under torchrun --------------------------------------------------------------------
def _torchrun(ranks, args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "moestack.cli", "train", *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


COMMON = [*TINY, "--train.eval_every", "0", "--moe.num_experts", "4", "--parallel.fssdp_budget", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_fssdp_training_equals_one_process_with_copies_resharding_and_rematerialization(tmp_path, ranks):
    """20 steps: skewed routing (the tiny model's), a placement where ranks own none of a layer's experts,
    copies on several ranks, re-sharding every 7 steps, Hecate-RM on; the losses are one process's."""
    single, run = tmp_path / "single", tmp_path / "fssdp"
    assert main(["train", *COMMON, "--steps", "20", "--run-dir", str(single)]) == 0
    placement = tmp_path / "placement.json"
    rows = [[0, 0, 1, 1], [1, 1, 0, 0]] if ranks == 2 else [[0, 0, 1, 1], [2, 2, 3, 3]]  # 4 ranks: 2 own none per layer
    placement.write_text(json.dumps({"format": "moestack.placement/v1", "num_gpus": ranks, "expert_to_gpu": rows,
                                     "allow_uneven": True}))
    proc = _torchrun(ranks, [*COMMON, "--steps", "20", "--run-dir", str(run), "--parallel.mode", "fssdp",
                             "--placement", str(placement), "--parallel.fssdp_reshard_every", "7",
                             "--parallel.fssdp_rematerialize", "true"], tmp_path)
    assert f"{ranks} ranks: experts fully sharded (FSSDP) over {ranks}" in proc.stderr
    want, got = losses(single), losses(run)
    assert sorted(got) == list(range(1, 21))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["fssdp_reshards"] >= 1
    assert sum(r["fssdp_copies"] for r in rows) > 0
    assert all(r["fssdp_gathered_mb"] == pytest.approx(2 * r["fssdp_materialized_mb"]) for r in rows)  # RM gathers twice
    # copies planned from the last steps' loads lower this step's rank imbalance on average (not every step)
    assert np.mean([r["fssdp_max_mean"] for r in rows]) < np.mean([r["fssdp_owner_max_mean"] for r in rows])


@pytest.mark.slow
def test_checkpoints_round_trip_fssdp_to_ep_to_fssdp(tmp_path):
    """A FSSDP run (3 ranks: 4 experts do not divide over them) resumed under EP (2 ranks), then FSSDP
    again (2 ranks), gives one process's losses; each expert is written once, by its owner."""
    single, run = tmp_path / "single", tmp_path / "run"
    common = [*COMMON, "--ckpt-every", "4", "--batch-size", "6"]
    assert main(["train", *common, "--steps", "12", "--run-dir", str(single)]) == 0
    _torchrun(3, [*common, "--steps", "4", "--run-dir", str(run), "--parallel.mode", "fssdp",
                  "--parallel.fssdp_reshard_every", "3"], tmp_path)
    manifest = json.loads(next((run / "ckpt").glob("step-00000004/manifest.json")).read_text())
    expert_keys = [k for k in json.dumps(manifest).split('"') if "experts.w13#" in k]
    assert expert_keys and len(expert_keys) == len(set(expert_keys))
    _torchrun(2, ["--run-dir", str(run), "--resume", "--steps", "8", "--parallel.mode", "ep", "--ep", "2"], tmp_path)
    _torchrun(2, ["--run-dir", str(run), "--resume", "--steps", "12", "--parallel.mode", "fssdp", "--ep", "0"], tmp_path)
    want, got = losses(single), losses(run)
    assert sorted(got) == list(range(1, 13))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
