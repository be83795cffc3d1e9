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
from tests.inference.helpers import D, E, K, RowCounter, hidden_batches, moe_layer

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
    shutdown(ctx)


def test_sharded_sparse_layer_matches_one_process():
    run_ranks(_check, 2)


def _kept_work_per_rank(layer, row, world):
    """Sub-expert computations the last forward of a single-process layer kept on each EP rank: [G]."""
    work = work_per_expert(layer.dispatcher.last_counts)  # [E]
    return torch.zeros(world, dtype=work.dtype).index_add_(0, torch.tensor(row), work)


def _check_load_aware(rank, world):
    """Load-aware dropping under EP levels the ranks from the global loads, as one process does.

    Rank 0's tokens are skewed towards its own experts and rank 1's are not: levelling from rank 1's own
    counts alone would drop uniformly where the whole batch says rank 0 must drop more.
    """
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    row = [e * world // E for e in range(E)]
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3)
    x = hidden_batches(1, tokens=4 * world * T, seed=5)[0]
    with torch.no_grad():
        top = layer.router(x).expert_ids[:, 0]  # [4*world*T] first choice of every token
    # rank 0's tokens all have their first choice on rank 0, rank 1's are unskewed: rank 0 is overloaded,
    # which rank 1's own counts do not show
    mine = x[torch.tensor(row)[top] == 0]
    assert mine.shape[0] >= 2 * T
    x_local = mine[: 2 * T] if rank == 0 else x[-2 * T:]  # [2T, D]
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([x_local.shape[0]]), group=ctx.ep_group)
    parts = [torch.zeros(int(n), D) for n in sizes]
    torch.distributed.all_gather(parts, x_local.contiguous(), group=ctx.ep_group)
    x_all = torch.cat(parts)  # the whole batch, as one process would see it

    set_drop_rate(layer, 0.3, load_aware=True, expert_rank=[row])
    with torch.no_grad():
        layer(x_all)
    want = _kept_work_per_rank(layer, row, world)  # [G] single-process levelling of the whole batch
    with torch.no_grad():
        per_expert = torch.bincount(layer.router(x_all).expert_ids.flatten(), minlength=E)  # [E]
    loads = torch.zeros(world, dtype=torch.int64).index_add_(0, torch.tensor(row), per_expert) * 2  # [G] parts
    rates = 1 - want.double() / loads  # [G] single-process rate of each rank
    assert rates[0].item() > rates[1].item() + 0.1, (rates.tolist(), loads.tolist())  # the overloaded rank drops more

    shard_sparse(layer, ctx, Placement(world, [row]))
    set_drop_rate(layer, 0.3, load_aware=True)
    reset_drop_stats(layer)
    with torch.no_grad():
        got = layer(x_local)[0]
    assert torch.isfinite(got).all()
    kept = work_per_expert(layer.dispatcher.last_counts).sum().reshape(1)  # computed on this rank
    everyone = [torch.zeros(1, dtype=kept.dtype) for _ in range(world)]
    torch.distributed.all_gather(everyone, kept, group=ctx.ep_group)
    got_work = torch.cat(everyone)  # [G]
    # each source rounds its own share of each rank's drops: at most half a computation per (source, rank)
    assert (got_work - want).abs().max().item() <= world, (got_work.tolist(), want.tolist())
    skipped = torch.tensor([drop_stats(layer)["skipped"]])
    torch.distributed.all_reduce(skipped, group=ctx.ep_group)
    assert skipped.item() / (x_all.shape[0] * K * 2) == pytest.approx(0.3, abs=0.01)
    shutdown(ctx)


def test_load_aware_under_ep_levels_by_the_global_loads():
    run_ranks(_check_load_aware, 2)


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
