"""Placement metrics against hand computations."""

import numpy as np
import pytest

from moestack.placement import CostModel, Placement, RoutingTrace, evaluate, objective


def tiny_trace():
    # 2 layers, 4 experts, top-1, 8 tokens: layer 0 loads [4,2,1,1], layer 1 loads [2,2,2,2]
    counts = np.array([[4, 2, 1, 1], [2, 2, 2, 2]])
    transitions = np.zeros((1, 4, 4), np.int64)
    for i, j in [(0, 0), (0, 0), (0, 1), (0, 1), (1, 2), (1, 3), (2, 2), (3, 3)]:
        transitions[0, i, j] += 1
    trace = RoutingTrace(counts, transitions, 1)
    trace.validate()
    return trace


def test_load_ratios_cross_fraction_and_objective_by_hand():
    trace = tiny_trace()
    placement = Placement(2, [[0, 0, 1, 1], [0, 0, 1, 1]])
    m = evaluate(placement, trace, comm_weight=2.0)
    # layer 0: gpu loads 6, 2 -> max/mean 6/4 = 1.5; layer 1: 4, 4 -> 1.0
    assert m.max_load_ratio == pytest.approx(1.5)
    assert m.mean_load_ratio == pytest.approx(1.25)
    # pairs crossing: (1,2) and (1,3) -> 2 of 8
    assert m.cross_fraction == pytest.approx(0.25)
    assert m.objective == pytest.approx(1.5 + 1.0 + 2.0 * 0.25)
    assert objective(placement, trace, 2.0) == pytest.approx(m.objective)


def test_modelled_time_follows_the_documented_model():
    trace = tiny_trace()
    cost = CostModel(hidden_size=10, ffn_size=20, bytes_per_elem=2, gpu_flops=1200.0, link_bandwidth=20.0)
    m = evaluate(Placement(2, [[0, 0, 1, 1], [0, 0, 1, 1]]), trace, cost=cost)
    # compute: (6 + 4) token-choices * 6*10*20 FLOPs / 1200 FLOP/s = 10 s
    assert m.compute_ms == pytest.approx(10_000.0)
    # a2a: gpu0 sends 2 tokens to gpu1, receives 0 -> 2 * 10 * 2 B / 20 B/s = 2 s
    assert m.comm_ms == pytest.approx(2_000.0)
    assert m.step_ms == pytest.approx(12_000.0)


def test_moestack_ep_time_sees_the_loads_not_the_transitions():
    """Under moestack's EP (tokens return home every layer) co-locating consecutive experts saves nothing."""
    from moestack.placement.metrics import CostModel, evaluate

    counts = np.full((2, 4), 8, dtype=np.int64)  # 16 tokens x top-2, even over 4 experts
    transitions = (np.eye(4, dtype=np.int64) * 8)[None]  # expert i of layer 0 always feeds expert i of layer 1
    trace = RoutingTrace(counts, transitions, 2)
    same = Placement(2, [[0, 0, 1, 1], [0, 0, 1, 1]])
    apart = Placement(2, [[0, 0, 1, 1], [1, 1, 0, 0]])
    cost = CostModel()
    a, b = evaluate(same, trace, cost=cost), evaluate(apart, trace, cost=cost)
    assert (a.cross_fraction, b.cross_fraction) == (0.0, 1.0) and a.step_ms < b.step_ms
    assert a.ep_ms == b.ep_ms
    # per layer: 16 choices computed per gpu; 8 rows in from the other home, 8 out, both ways
    want = 2 * (cost.compute_s(16.0) + 2 * cost.comm_s(8.0)) * 1e3
    assert a.ep_ms == pytest.approx(want)
    skewed = Placement(2, [[0, 0, 0, 1], [0, 1, 1, 1]], allow_uneven=True)
    assert evaluate(skewed, trace, cost=cost).ep_ms > a.ep_ms  # 24 choices on one gpu: slower
