"""How torchrun's world splits into data- and expert-parallel ranks (ep auto by default, or as asked)."""

import pytest

from moestack.config import ConfigError, ParallelConfig, load_config
from moestack.parallel.mesh import resolve_sizes


@pytest.mark.parametrize("world, experts, want", [
    (1, 8, (1, 1)), (2, 8, (1, 2)), (8, 8, (1, 8)), (16, 8, (2, 8)), (6, 8, (3, 2)), (3, 8, (3, 1)), (4, 6, (2, 2)),
])
def test_auto_ep_is_the_largest_divisor_of_world_and_experts(world, experts, want, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_sizes(ParallelConfig(), world, experts) == want


def test_auto_ep_stays_inside_a_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 nodes of 8: the all-to-all stays on NVLink
    assert resolve_sizes(ParallelConfig(), 16, 64) == (2, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    assert resolve_sizes(ParallelConfig(), 12, 8) == (6, 2)


def test_auto_ep_follows_the_placement_file(tmp_path):
    from moestack.placement.placement import Placement

    path = tmp_path / "p2.json"
    Placement.contiguous(2, 8, 2).save(path)
    assert resolve_sizes(ParallelConfig(placement=str(path)), 4, 8) == (2, 2)
    with pytest.raises(ConfigError, match="places the experts on 2 GPUs but torchrun started 3 ranks"):
        resolve_sizes(ParallelConfig(placement=str(path)), 3, 8)


def test_auto_ep_with_dp_given_and_explicit_sizes():
    assert resolve_sizes(ParallelConfig(dp=2), 4, 8) == (2, 2)
    assert resolve_sizes(ParallelConfig(ep=1), 4, 8) == (4, 1)  # data parallel only
    assert resolve_sizes(ParallelConfig(ep=2, dp=2), 4, 8) == (2, 2)


@pytest.mark.parametrize("cfg, world, message", [
    (ParallelConfig(dp=3), 4, "--dp 3 does not divide the world size 4"),
    (ParallelConfig(dp=1), 4, "leaves ep = 4, which does not divide the 6 experts"),
    (ParallelConfig(ep=4), 6, "--ep 4 does not divide the world size 6"),
    (ParallelConfig(ep=2, dp=1), 4, "--dp 1 x --ep 2 = 2 but torchrun started 4 ranks"),
])
def test_sizes_that_do_not_fit_are_one_clear_error(cfg, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_sizes(cfg, world, 6)


def test_negative_ep_and_capacity_with_ep_are_refused():
    with pytest.raises(ConfigError, match="parallel.ep must be >= 0"):
        load_config(overrides={"parallel.ep": "-1"})
    with pytest.raises(ConfigError, match="capacity_factor > 0 is not supported with expert parallelism"):
        load_config(overrides={"parallel.ep": "2", "moe.capacity_factor": "1.0"})
    load_config(overrides={"moe.capacity_factor": "1.0"})  # ep auto: one process is not expert parallel


def _train_with_capacity(rank, world, run_dir):
    from moestack.train import train

    cfg = load_config(overrides={"moe.capacity_factor": "1.0", "train.device": "cpu", "train.run_dir": run_dir})
    with pytest.raises(ConfigError, match=r"not supported with expert parallelism \(ep = 2"):
        train(cfg)


def test_capacity_under_torchrun_with_ep_auto_is_refused(tmp_path):
    from tests.dist import run_ranks

    run_ranks(_train_with_capacity, 2, str(tmp_path / "run"))


def test_dp_in_one_process_is_refused():
    with pytest.raises(ConfigError, match="--dp 2 x --ep 1 = 2 but torchrun started 1 ranks"):
        resolve_sizes(ParallelConfig(dp=2), 1, 8)
    assert resolve_sizes(ParallelConfig(), 1, 8) == (1, 1)


def _train_data_parallel_with_capacity(rank, world, run_dir):
    import json
    from pathlib import Path

    from moestack.train import train

    cfg = load_config(overrides={
        "parallel.ep": "1", "moe.capacity_factor": "0.5", "train.device": "cpu", "train.run_dir": run_dir,
        "model.d_model": "32", "model.n_heads": "2", "model.n_layers": "2", "model.seq_len": "32",
        "moe.num_experts": "4", "moe.d_ff": "32", "train.batch_size": "4", "train.steps": "2",
        "train.log_every": "1", "train.eval_every": "0", "checkpoint.every": "0"})
    train(cfg)
    if rank == 0:
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        dropped = [r["dropped"] for r in rows if "dropped" in r]
        # capacity 0.5 x each rank's mean load: at least half of rank 0's 2 x 32 x 2 token-choices per layer drop
        assert len(dropped) == 2 and all(min(d) >= 64 for d in dropped), dropped


def test_data_parallel_torchrun_keeps_the_capacity_factor(tmp_path):
    """--ep 1 on 2 ranks: every rank holds every expert and drops over capacity, as one process does."""
    from tests.dist import run_ranks

    run_ranks(_train_data_parallel_with_capacity, 2, str(tmp_path / "run"))


def test_a_capacity_run_used_under_torchrun_is_one_clear_error(tmp_path, monkeypatch):
    from moestack.config import to_toml
    from moestack.runs import run_config

    (tmp_path / "config.toml").write_text(to_toml(load_config(overrides={"moe.capacity_factor": "1.0", "parallel.ep": "1"})))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="run this command in one process, without torchrun"):
        run_config(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_config(tmp_path, "cpu").moe.capacity_factor == 1.0
