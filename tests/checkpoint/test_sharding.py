import pytest
import torch

from moestack.checkpoint import CheckpointError
from moestack.checkpoint.sharding import expert_summary, local_layout, plan_shards

from tests.checkpoint.helpers import make_state


def _layout(ids, **kw):
    return local_layout(*make_state(1, ids=ids, **kw))


def test_replicas_write_each_tensor_once_balanced():
    layouts = [_layout(range(8), dense=(256, 64))] * 4
    plan = plan_shards(layouts, [list(range(8))] * 2)
    keys = [it.key for items in plan for it in items]
    assert len(keys) == len(set(keys)) == len(layouts[0]) - 12 + 12 * 8
    loads = [sum(it.nbytes for it in items) for items in plan]
    biggest = max(it.nbytes for items in plan for it in items)
    assert max(loads) - min(loads) <= biggest


def test_experts_are_written_by_a_rank_holding_them():
    layouts = [_layout(range(0, 4)), _layout(range(4, 8))]
    plan = plan_shards(layouts, [[1, 2, 5, 6], [0, 7]])
    for rank, items in enumerate(plan):
        for it in items:
            if it.expert is not None:
                assert it.expert // 4 == rank
    experts = [(it.layer, it.expert) for items in plan for it in items if it.expert is not None]
    assert set(experts) == {(0, 1), (0, 2), (0, 5), (0, 6), (1, 0), (1, 7)}
    assert len(experts) == 6 * 6  # 6 expert-stacked tensors per layer: w1, w2 and their two moments


def test_expert_replicas_split_across_dp():
    # ep = 2 x dp = 2: ranks 0 and 2 hold experts 0-3, ranks 1 and 3 hold 4-7
    layouts = [_layout(range(0, 4)), _layout(range(4, 8)), _layout(range(0, 4)), _layout(range(4, 8))]
    plan = plan_shards(layouts, [list(range(8))] * 2)
    counts = [sum(it.expert is not None for it in items) for items in plan]
    assert sum(counts) == 2 * 8 * 6 and max(counts) - min(counts) <= 2


def test_inconsistent_replicas_are_an_error():
    a = _layout(range(8))
    b = local_layout({**make_state(1)[0], "model.embed.weight": torch.zeros(3)}, make_state(1)[1])
    with pytest.raises(CheckpointError, match="model.embed.weight"):
        plan_shards([a, b], [list(range(8))] * 2)


def test_expert_held_by_no_rank_is_an_error():
    with pytest.raises(CheckpointError, match=r"experts \[3\] are held by no rank"):
        expert_summary([_layout([0, 1, 2]), _layout([4, 5, 6, 7])], 8)
