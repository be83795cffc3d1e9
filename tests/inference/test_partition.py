"""Expert partition and neuron reordering leave every expert's function unchanged."""

import pytest
import torch

from moestack.inference.partition import (
    check_parts,
    merge_experts,
    reorder_neurons,
    split_experts,
    sub_experts,
)
from moestack.moe.experts import GroupedExperts

E, D, F = 3, 8, 12


def experts(seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(E, D, F, impl="loop")
    ex.reset_parameters(std=0.3)
    return ex


def per_expert(ex, x):
    """Every token through every expert: [E, T, D] (the loop reference)."""
    counts = torch.full((ex.num_experts,), x.shape[0])
    return ex(x.repeat(ex.num_experts, 1), counts).view(ex.num_experts, x.shape[0], D)


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_then_merge_is_identity(parts):
    ex = experts()
    w13, w2 = merge_experts(*split_experts(ex.w13.detach(), ex.w2.detach(), parts), parts)
    assert torch.equal(w13, ex.w13.detach()) and torch.equal(w2, ex.w2.detach())


@pytest.mark.parametrize("parts", [2, 3])
def test_sub_experts_sum_to_the_expert(parts):
    ex, x = experts(), torch.randn(5, D)
    sub = sub_experts(ex, parts)
    assert sub.w13.shape == (E * parts, D, 2 * F // parts) and sub.w2.shape == (E * parts, F // parts, D)
    assert sub.global_ids == list(range(E * parts))
    want = per_expert(ex, x)  # [E, T, D]
    got = per_expert(sub, x).view(E, parts, 5, D).sum(dim=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_reordering_neurons_preserves_each_expert():
    ex, x = experts(), torch.randn(5, D)
    perm = torch.stack([torch.randperm(F) for _ in range(E)])
    w13, w2 = reorder_neurons(ex.w13.detach(), ex.w2.detach(), perm)
    moved = experts()
    with torch.no_grad():
        moved.w13.copy_(w13)
        moved.w2.copy_(w2)
    torch.testing.assert_close(per_expert(moved, x), per_expert(ex, x), atol=1e-6, rtol=1e-5)
    assert torch.equal(w2[1, 0], ex.w2.detach()[1, perm[1, 0]])


def test_parts_must_divide_the_expert_hidden_size():
    with pytest.raises(ValueError, match="divide the expert hidden size 12"):
        check_parts(12, 5)
