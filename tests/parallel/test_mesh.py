"""How torchrun's world splits into data- and expert-parallel ranks (ep auto by default, or as asked)."""

import pytest

from moestack.config import ConfigError, ParallelConfig, load_config
from moestack.parallel.mesh import resolve_sizes


@pytest.mark.parametrize("world, experts, want", [
    (1, 8, (1, 1)), (2, 8, (1, 2)), (8, 8, (1, 8)), (16, 8, (2, 8)), (6, 8, (3, 2)), (3, 8, (3, 1)), (4, 6, (2, 2)),
])
def test_auto_ep_is_the_largest_divisor_of_world_and_experts(world, experts, want):
    assert resolve_sizes(ParallelConfig(), world, experts) == want


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
