"""The expert-parallel MoE layer equals the single-process layer (outputs and gradients, fp32)."""

import pytest
import torch
import torch.distributed as dist

from moestack.config import ParallelConfig
from moestack.moe.layer import MoELayer
from moestack.parallel.ep import shard_layer
from moestack.parallel.mesh import init_parallel, shutdown
from moestack.placement.placement import Placement
from tests.dist import run_ranks

E, D, F, K, T = 8, 16, 24, 2, 12  # experts, hidden, expert hidden, top-k, tokens per rank


def _layer(skewed: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, K, F, aux_loss_coef=0.01, z_loss_coef=0.0)
    if skewed:  # experts 4..7 (the second half) never win: their ranks get no tokens
        with torch.no_grad():
            layer.router.gate.weight[E // 2:, 0] = -100.0
    return layer


def _inputs(world: int, skewed: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=g)
    if skewed:
        x[:, 0] = x[:, 0].abs() + 1.0
    return x, torch.randn(world * T, D, generator=g)


def _ep_layer(rank, world, ctx, placement_rows, skewed):
    """This rank's shard of `_layer(skewed)` under the placement, with the EP dispatcher: (layer, its experts)."""
    layer = _layer(skewed)
    placement = Placement(world, placement_rows)
    layer.dispatcher = shard_layer(layer, ctx, placement, 0)  # the wiring apply_expert_parallel uses
    return layer, placement.experts_on(0, rank)


def _check_all(rank, world, cases):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    for placement_rows, skewed in cases:
        _check(rank, world, ctx, placement_rows, skewed)
    shutdown(ctx)


def _check(rank, world, ctx, placement_rows, skewed):
    x_all, g_all = _inputs(world, skewed)
    rows = slice(rank * T, (rank + 1) * T)

    ref = _layer(skewed)  # single-process reference over every rank's tokens
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * g_all).sum() + aux_ref * world).backward()

    layer, mine = _ep_layer(rank, world, ctx, placement_rows, skewed)
    x = x_all[rows].clone().requires_grad_()
    y, aux = layer(x)
    ((y * g_all[rows]).sum() + aux).backward()

    torch.testing.assert_close(y, y_ref[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, aux_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[rows], atol=1e-5, rtol=1e-5)
    idx = torch.tensor(mine)
    torch.testing.assert_close(layer.experts.w13.grad, ref.experts.w13.grad[idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w2.grad, ref.experts.w2.grad[idx], atol=1e-5, rtol=1e-5)
    gate = layer.router.gate.weight.grad.clone()
    dist.all_reduce(gate)  # replicated parameter: the ranks' gradients sum to the reference's
    torch.testing.assert_close(gate, ref.router.gate.weight.grad, atol=1e-5, rtol=1e-5)
    if skewed:
        received = layer.experts.w13.grad.abs().sum().item()
        assert (received == 0) == (rank >= world // 2)


def contiguous(world):
    return [[e * world // E for e in range(E)]]


def shuffled(world):
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(5)).tolist()
    row = [0] * E
    for i, e in enumerate(perm):
        row[e] = i * world // E
    return [row]


@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_matches_single_process_contiguous_shuffled_and_skewed(world):
    """Contiguous and shuffled placements, and skewed routing where half the ranks get no tokens."""
    cases = [(contiguous(world), False), (shuffled(world), False), (contiguous(world), True)]
    run_ranks(_check_all, world, cases)


def _check_empty_rank(rank, world):
    """Rank 1 brings no tokens (an uneven last batch): the layer still matches the reference, both ways."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    x_all, g_all = _inputs(world, False)
    x_all, g_all = x_all[:T], g_all[:T]  # rank 0's tokens only
    ref = _layer(False)
    x_ref = x_all.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * g_all).sum() + aux_ref * world).backward()

    layer, mine = _ep_layer(rank, world, ctx, contiguous(world), False)
    rows = slice(0, T) if rank == 0 else slice(0, 0)
    x = x_all[rows].clone().requires_grad_()
    y, aux = layer(x)
    ((y * g_all[rows]).sum() + aux).backward()
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[rows], atol=1e-5, rtol=1e-5)
    idx = torch.tensor(mine)
    torch.testing.assert_close(layer.experts.w13.grad, ref.experts.w13.grad[idx], atol=1e-5, rtol=1e-5)
    shutdown(ctx)


def test_ep_layer_with_a_rank_that_has_no_tokens():
    run_ranks(_check_empty_rank, 2)


def _check_autocast(rank, world):
    """Under bf16 autocast the rows cross the all-to-all in bf16 and the layer matches one process's
    autocast output; gradients reach the fp32 input and the fp32 expert weights."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    x_all, g_all = _inputs(world, False)
    rows = slice(rank * T, (rank + 1) * T)
    ref = _layer(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, _ = ref(x_all)
    layer, mine = _ep_layer(rank, world, ctx, contiguous(world), False)
    sent = []
    real = layer.dispatcher.dispatch
    layer.dispatcher.dispatch = lambda x, routing: (sent.append(x.dtype), real(x, routing))[1]
    x = x_all[rows].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    ((y.float() * g_all[rows]).sum() + aux).backward()
    assert sent == [torch.bfloat16]
    torch.testing.assert_close(y.float(), y_ref[rows].float(), atol=1e-2, rtol=1e-2)
    assert x.grad.dtype == torch.float32 and layer.experts.w13.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and layer.experts.w13.grad.abs().sum() > 0
    shutdown(ctx)


def test_ep_layer_under_autocast_sends_bf16_rows():
    run_ranks(_check_autocast, 2)
