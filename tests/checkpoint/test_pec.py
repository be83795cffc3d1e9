import numpy as np
import pytest

from moestack.checkpoint.pec import PecState, choose_k, recover, select_experts_to_save


def _select(policy, k, copy_step, unsaved=None):
    copy_step = np.asarray([copy_step])
    unsaved = np.zeros_like(copy_step) if unsaved is None else np.asarray([unsaved])
    return select_experts_to_save(policy, k, copy_step, unsaved)[0]


def test_first_checkpoint_saves_every_expert():
    assert _select("sequential", 2, [-1] * 8) == list(range(8))
    assert _select("load_aware", 1, [-1, 5, -1, 5]) == [0, 2]


def test_sequential_is_round_robin():
    state = PecState.empty(1, 8).after_save(0, [list(range(8))])
    seen = []
    for step in range(1, 9):
        chosen = select_experts_to_save("sequential", 3, state.copy_step, state.unsaved())[0]
        seen.append(chosen)
        state = state.after_save(step, [chosen])
    assert seen[:4] == [[0, 1, 2], [3, 4, 5], [0, 6, 7], [1, 2, 3]]
    # every expert is saved at least once in every ceil(E / K) = 3 consecutive checkpoints
    for i in range(len(seen) - 2):
        assert set().union(*seen[i:i + 3]) == set(range(8))


def test_load_aware_picks_most_unsaved_tokens():
    assert _select("load_aware", 2, [3, 3, 3, 3], [5, 50, 7, 40]) == [1, 3]
    # ties on tokens fall back to least recently saved
    assert _select("load_aware", 1, [4, 2, 3, 3], [9, 9, 1, 1]) == [1]


def test_k_zero_or_large_saves_all():
    assert _select("sequential", 0, [1, 1, 1]) == [0, 1, 2]
    assert _select("load_aware", 9, [1, 1, 1]) == [0, 1, 2]


def test_unknown_policy():
    with pytest.raises(ValueError, match="sequential|load_aware"):
        _select("lru", 1, [1, 1])


def test_plt_hand_computed_example():
    # 1 layer, 4 experts, K = 1 sequential; tokens per interval below
    s = PecState.empty(1, 4).add_tokens(np.array([[10, 20, 30, 40]]))
    s = s.after_save(1, [[0, 1, 2, 3]])  # first checkpoint: full
    assert s.plt() == 0.0
    s = s.add_tokens(np.array([[10, 20, 30, 40]])).after_save(2, [[0]])
    # lost if failed now: e1 20 + e2 30 + e3 40 = 90 of 200
    assert s.plt() == pytest.approx(90 / 200)
    s = s.add_tokens(np.array([[5, 5, 5, 5]])).after_save(3, [[1]])
    # e0 25-20=5, e1 0, e2 65-30=35, e3 85-40=45 -> 85 of 220
    assert s.lost_if_failed().tolist() == [[5, 0, 35, 45]]
    assert s.plt() == pytest.approx(85 / 220)
    # failure after step 3: e0 from step 2, e1 from 3, e2 and e3 from 1
    source = PecState(np.array([[20, 45, 30, 40]]), np.zeros((1, 4), np.int64), np.array([[2, 3, 1, 1]]),
                      np.array([[20, 45, 30, 40]]), np.zeros((1, 4), np.int64))
    r = recover(s, source, np.array([[2, 3, 1, 1]]))
    assert r.lost.tolist() == [[5, 0, 35, 45]] and r.processed.sum() == 220
    # continue: 10 more tokens each, checkpoint 4 saves e2: its copy keeps the 35 lost tokens
    r = r.add_tokens(np.array([[10, 10, 10, 10]])).after_save(4, [[2]])
    assert r.lost_if_failed().tolist() == [[15, 10, 35, 55]]
    assert r.plt() == pytest.approx(115 / 260)


def test_adaptive_k_keeps_plt_under_threshold():
    s = PecState.empty(1, 8).add_tokens(np.full((1, 8), 10)).after_save(1, [list(range(8))])
    s = s.add_tokens(np.full((1, 8), 10))  # 80 unsaved of 160 processed
    # saving k experts leaves (8 - k) * 10 unsaved: PLT (8 - k) / 16 <= 0.2 needs k >= 5
    assert choose_k(s, "sequential", 1, 0.2, step=2) == 5
    assert choose_k(s, "sequential", 6, 0.2, step=2) == 6
    assert choose_k(s, "load_aware", 1, 0.0, step=2) == 8


def test_state_json_round_trip():
    s = PecState.empty(2, 3).add_tokens(np.arange(6).reshape(2, 3)).after_save(7, [[0], [1, 2]])
    back = PecState.from_json(s.to_json())
    for name in ("processed", "lost", "copy_step", "copy_processed", "copy_lost"):
        assert np.array_equal(getattr(back, name), getattr(s, name))
    assert PecState.from_json(PecState.empty(0, 0).to_json()).shape == (0, 0)
