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
