"""Routing traces: recorder against a hand count, the .npz format, and clear errors for bad traces."""

import numpy as np
import pytest
import torch

from moestack.placement import RoutingTrace, TraceError, TraceRecorder


def hand_trace():
    """Three tokens, two layers, top-2, four experts, counted by hand."""
    layer0 = torch.tensor([[0, 1], [1, 2], [0, 3]])
    layer1 = torch.tensor([[2, 3], [2, 0], [1, 3]])
    counts = np.array([[2, 2, 1, 1], [1, 1, 2, 2]])
    transitions = np.zeros((1, 4, 4), dtype=np.int64)
    for a, b in zip(layer0.tolist(), layer1.tolist()):
        for i in a:
            for j in b:
                transitions[0, i, j] += 1
    return layer0, layer1, counts, transitions


def test_recorder_matches_hand_count():
    layer0, layer1, counts, transitions = hand_trace()
    recorder = TraceRecorder(num_layers=2, num_experts=4)
    recorder.record(0, layer0)
    recorder.record(1, layer1)
    trace = recorder.trace()
    assert trace.top_k == 2 and trace.num_tokens == 3
    np.testing.assert_array_equal(trace.counts, counts)
    np.testing.assert_array_equal(trace.transitions, transitions)
    # token 0: {0,1} -> {2,3}: pairs (0,2) (0,3) (1,2) (1,3)
    assert trace.transitions[0, 0, 2] == 1 and trace.transitions[0, 1, 3] == 1
    assert trace.transitions[0, 0, 3] == 2  # tokens 0 and 2


def test_recorder_accumulates_forwards_and_keeps_consistency():
    layer0, layer1, counts, transitions = hand_trace()
    recorder = TraceRecorder(2, 4, top_k=2)
    for _ in range(3):
        recorder.record(0, layer0)
        recorder.record(1, layer1)
    trace = recorder.trace()
    np.testing.assert_array_equal(trace.counts, 3 * counts)
    np.testing.assert_array_equal(trace.transitions, 3 * transitions)
    trace.validate()


def test_recorder_rejects_out_of_order_layers_and_changed_token_counts():
    recorder = TraceRecorder(3, 4)
    with pytest.raises(TraceError, match="got layer 1 but expected layer 0"):
        recorder.record(1, torch.tensor([[0, 1]]))
    recorder.record(0, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(TraceError, match="layer 1 got 1 tokens but layer 0 got 2"):
        recorder.record(1, torch.tensor([[0, 1]]))
    with pytest.raises(TraceError, match="top_k=3 but the trace has top_k=2"):
        recorder.record(1, torch.tensor([[0, 1, 2], [0, 1, 2]]))
    with pytest.raises(TraceError, match="outside 0..3"):
        recorder.record(1, torch.tensor([[0, 4], [0, 1]]))
    recorder.record(1, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(TraceError, match="stopped after layer 1 of 3"):
        recorder.trace()


def test_npz_round_trip(tmp_path):
    layer0, layer1, counts, transitions = hand_trace()
    trace = RoutingTrace(counts, transitions, 2)
    trace.save(tmp_path / "trace.npz")
    loaded = RoutingTrace.load(tmp_path / "trace.npz")
    assert loaded.top_k == 2 and loaded.counts.dtype == np.int64
    np.testing.assert_array_equal(loaded.counts, counts)
    np.testing.assert_array_equal(loaded.transitions, transitions)
    with np.load(tmp_path / "trace.npz") as data:
        assert sorted(data.files) == ["counts", "top_k", "transitions"]
    with pytest.raises(TraceError, match="is a folder; pass a file name"):
        trace.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.npz"]  # no temporary file left behind


def save_raw(tmp_path, **arrays):
    path = tmp_path / "trace.npz"
    np.savez(path, **arrays)
    return path


def malformed_cases():
    _, _, counts, transitions = hand_trace()
    negative = counts.copy()
    negative[1, 2] = -1
    moved = transitions.copy()
    moved[0, 0, 2] -= 1
    moved[0, 1, 2] += 1  # same total, wrong row sums
    return [
        (dict(counts=counts[0], transitions=transitions, top_k=2), "'counts' has shape (4,) but must be 2-D [L, E]"),
        (dict(counts=counts, transitions=transitions[0], top_k=2), "'transitions' has shape (4, 4) but must be [L-1, E, E] = (1, 4, 4)"),
        (dict(counts=counts, transitions=np.zeros((1, 4, 5), np.int64), top_k=2), "must be [L-1, E, E]"),
        (dict(counts=negative, transitions=transitions, top_k=2), "'counts' has a negative entry -1 at (1, 2)"),
        (dict(counts=counts.astype(np.float32), transitions=transitions, top_k=2), "'counts' has dtype float32 but must be an integer dtype"),
        (dict(counts=counts, transitions=moved, top_k=2), "'transitions'[0] row sum for expert 0 is 3 but must be top_k * counts[0, 0] = 2 * 2 = 4"),
        (dict(counts=counts, transitions=2 * transitions, top_k=2), "counts and transitions disagree"),
        (dict(counts=counts, transitions=transitions, top_k=5), "'top_k' is 5 but must be an integer in 1..4"),
        (dict(counts=counts, transitions=transitions), "missing key 'top_k'"),
        (dict(counts=counts, transitions=transitions, top_k=np.array([2, 2])), "'top_k' must be one integer"),
    ]


@pytest.mark.parametrize("arrays, needle", malformed_cases())
def test_malformed_traces_get_one_clear_error(tmp_path, arrays, needle):
    path = save_raw(tmp_path, **arrays)
    with pytest.raises(TraceError) as err:
        RoutingTrace.load(path)
    assert needle in str(err.value)
    assert str(err.value).startswith(str(path))


def test_layers_with_different_token_totals_are_rejected():
    counts = np.array([[2, 2], [1, 1]])
    with pytest.raises(TraceError, match="'counts' of layer 1 sum to 2 but every layer must sum to the same"):
        RoutingTrace(counts, np.zeros((1, 2, 2), np.int64), 1).validate()


def test_not_an_npz_file(tmp_path):
    path = tmp_path / "trace.npz"
    path.write_text("hello")
    with pytest.raises(TraceError, match="not an .npz archive"):
        RoutingTrace.load(path)
    with pytest.raises(TraceError, match="file not found"):
        RoutingTrace.load(tmp_path / "missing.npz")


def test_single_layer_trace_has_empty_transitions(tmp_path):
    trace = RoutingTrace(np.array([[3, 1]]), np.zeros((0, 2, 2), np.int64), 1)
    trace.save(tmp_path / "t.npz")
    assert RoutingTrace.load(tmp_path / "t.npz").transitions.shape == (0, 2, 2)
