"""A sparsified layer sharded over 2 gloo ranks gives the single-process outputs, computing only kept rows."""

import pytest
import torch

from moestack.config import ParallelConfig
from moestack.inference.dropping import work_per_expert
from moestack.inference.dualsparse import drop_stats, reset_drop_stats, set_drop_rate, sparsify
from moestack.inference.ep import EPDualSparseDispatcher, shard_sparse
from moestack.parallel.mesh import init_parallel, shutdown
from moestack.placement.placement import Placement
from tests.dist import run_ranks
from tests.inference.helpers import E, K, RowCounter, hidden_batches, moe_layer

T = 32  # tokens per rank


def _check(rank, world):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    x_all = hidden_batches(1, tokens=world * T, seed=3)[0]
    for row in ([e * world // E for e in range(E)], [e % world for e in range(E)]):
        layer = sparsify(moe_layer(), hidden_batches(4), 0.3)
        with torch.no_grad():
            want = layer(x_all)[0][rank * T:(rank + 1) * T]
        shard_sparse(layer, ctx, Placement(world, [row]))
        set_drop_rate(layer, 0.3)  # uniform: every rank applies the same threshold
        reset_drop_stats(layer)
        with RowCounter(layer.experts) as counter, torch.no_grad():
            got = layer(x_all[rank * T:(rank + 1) * T])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert layer.experts.w13.shape[0] == E // world
        assert isinstance(layer.dispatcher, EPDualSparseDispatcher)
        run = torch.tensor([T * K * 2 - drop_stats(layer)["skipped"]])  # part computations this rank asked for
        done = work_per_expert(layer.dispatcher.last_counts).sum().reshape(1)  # ... this rank computed
        rows = torch.tensor([counter.rows[0]])
        for t in (run, done, rows):
            torch.distributed.all_reduce(t, group=ctx.ep_group)
        assert done.item() == run.item() < world * T * K * 2  # only kept parts are computed
        assert rows.item() < world * T * K  # choices with every part dropped do not travel
        # load-aware: each rank levels its own tokens' work over the expert ranks (rates from its own loads, a
        # batch quantile per target rank), so the rate it achieves is the target, whatever the skew
        set_drop_rate(layer, 0.3, load_aware=True)
        reset_drop_stats(layer)
        with torch.no_grad():
            got_la = layer(x_all[rank * T:(rank + 1) * T])[0]
        assert torch.isfinite(got_la).all() and drop_stats(layer)["drop_rate"] == pytest.approx(0.3, abs=0.02)
    shutdown(ctx)


def test_sharded_sparse_layer_matches_one_process():
    run_ranks(_check, 2)


def _check_empty_rank(rank, world):
    """Rank 1 brings no tokens: rank 0 still gets the single-process output, rank 1 an empty one."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    x0 = hidden_batches(1, tokens=T, seed=3)[0]
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3)
    with torch.no_grad():
        want = layer(x0)[0]
    shard_sparse(layer, ctx, Placement(world, [[e * world // E for e in range(E)]]))
    set_drop_rate(layer, 0.3)
    x = x0 if rank == 0 else x0[:0]
    with torch.no_grad():
        got = layer(x)[0]
    assert got.shape == x.shape
    if rank == 0:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    shutdown(ctx)


def test_sharded_sparse_layer_with_a_rank_that_has_no_tokens():
    run_ranks(_check_empty_rank, 2)
