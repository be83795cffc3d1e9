"""Load-aware dropping: overloaded EP ranks drop more, the total drop stays on target, the slowest rank gains."""

import pytest
import torch

from moestack.inference.dropping import load_aware_rates, work_per_expert
from moestack.inference.dualsparse import drop_stats, reset_drop_stats, set_drop_rate, sparsify
from tests.inference.helpers import E, hidden_batches, moe_layer


def kept(loads, rates):
    return loads * (1 - rates)


@pytest.mark.parametrize("loads", [[400.0, 100.0, 100.0, 100.0], [10.0, 20.0, 30.0, 40.0], [5.0, 0.0, 300.0, 7.0]])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4])
def test_load_aware_rates_drop_the_target_and_level_the_ranks(loads, rate):
    L = torch.tensor(loads)
    rates = load_aware_rates(L, rate, max_rate=0.5)
    assert kept(L, rates).sum().item() == pytest.approx((1 - rate) * L.sum().item(), rel=1e-5)
    assert ((rates >= -1e-6) & (rates <= 0.5 + 1e-6)).all()
    busiest = int(L.argmax())
    assert rates[busiest] >= rates.max() - 1e-6  # the most loaded rank drops the most
    uniform_max = (L * (1 - rate)).max()
    assert kept(L, rates).max() <= uniform_max + 1e-4  # the slowest rank never does more work


def test_balanced_loads_get_the_uniform_rate():
    rates = load_aware_rates(torch.full((4,), 50.0), 0.25, max_rate=0.5)
    torch.testing.assert_close(rates, torch.full((4,), 0.25))


def test_the_per_rank_cap_bounds_the_drop_of_an_overloaded_rank():
    rates = load_aware_rates(torch.tensor([100.0, 10.0, 10.0, 10.0]), 0.4, max_rate=0.5)
    assert rates[0] == pytest.approx(0.5, abs=1e-6)  # levelling would need more: capped
    assert (rates[1:] > 0).all()  # the rest of the target is spread over the other ranks


def test_overloaded_rank_drops_more_at_run_time():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.gate.weight[:2] += 0.6 * layer.router.gate.weight[2:4]  # skew towards experts 0, 1
    layer = sparsify(layer, hidden_batches(8, tokens=128), 0.25)
    ranks = [e * 4 // E for e in range(E)]  # 4 EP ranks, 2 experts each
    x = hidden_batches(1, tokens=256, seed=4)[0]
    work = {}
    for load_aware in (False, True):
        set_drop_rate(layer, 0.25, load_aware=load_aware, expert_rank=[ranks])
        reset_drop_stats(layer)
        with torch.no_grad():
            layer(x)
        per_rank = work_per_expert(layer.dispatcher.last_counts).float()  # kept computations per expert
        work[load_aware] = torch.zeros(4).index_add_(0, torch.tensor(ranks), per_rank)
        assert drop_stats(layer)["drop_rate"] == pytest.approx(0.25, abs=0.05)
    routed = torch.bincount(layer.router(x).expert_ids.flatten(), minlength=E).view(4, 2).sum(1) * 2
    busiest = int(routed.argmax())
    drop_uniform = 1 - work[False] / routed
    drop_aware = 1 - work[True] / routed
    assert drop_aware[busiest] > drop_uniform[busiest] + 0.05
    assert work[True].max() < work[False].max()
