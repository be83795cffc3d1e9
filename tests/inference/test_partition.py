"""Expert partition and neuron reordering leave every expert's function unchanged."""

import pytest
import torch

from moestack.inference.partition import (
    PartExperts,
    check_parts,
    from_parts,
    part_experts,
    reorder_neurons,
    to_parts,
)
from moestack.inference.dropping import segment_slots, sort_by_parts
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
def test_to_parts_then_from_parts_is_identity(parts):
    w13 = experts().w13.detach()
    assert torch.equal(from_parts(to_parts(w13, parts), parts), w13)
    if parts > 1:  # part 0's gate then up columns come first
        f = F // parts
        torch.testing.assert_close(to_parts(w13, parts)[..., :2 * f], torch.cat([w13[..., :f], w13[..., F:F + f]], -1))


def first_parts_reference(ex, x, j, parts):
    """Every token through every expert with only its first j*F/P neurons: [E, T, D]."""
    cut = experts()
    with torch.no_grad():
        cut.w13.copy_(ex.w13)
        cut.w2.copy_(ex.w2)
        cut.w2[:, j * F // parts:] = 0
    return per_expert(cut, x)


@pytest.mark.parametrize("parts", [2, 3])
def test_part_experts_run_the_first_j_parts_of_each_row(parts):
    ex, x = experts(), torch.randn(5, D)
    pe = part_experts(ex, parts)
    assert isinstance(pe, PartExperts) and pe.w13.shape == ex.w13.shape and pe.global_ids == [0, 1, 2]
    rows, counts, want = [], torch.zeros(parts, E, dtype=torch.int64), []
    for j in range(1, parts + 1):  # every token through every expert at every j, sorted by (j, expert)
        rows.append(x.repeat(E, 1))
        counts[j - 1] = x.shape[0]
        want.append(first_parts_reference(ex, x, j, parts).reshape(-1, D))
    got = pe(torch.cat(rows), counts)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(want[-1].view(E, 5, D), per_expert(ex, x), atol=1e-6, rtol=1e-5)  # j = P: whole


@pytest.mark.parametrize("impl", ["loop", "auto"])  # auto: torch._grouped_mm where it runs (CPU: yes)
@pytest.mark.parametrize("parts", [2, 3])
def test_padded_segments_compute_what_the_packed_layout_computes(parts, impl):
    torch.manual_seed(3)
    R = 40  # choices
    j = torch.randint(0, parts + 1, (R,))  # parts each choice runs (0: none)
    slot_of = torch.randint(0, E, (R,))
    d, f = 16, 48  # part widths (24, 16) are multiples of 8, so part_experts keeps torch._grouped_mm
    ex = GroupedExperts(E, d, f, impl=impl)
    x = torch.randn(R, d)
    pe = part_experts(ex, parts)
    assert pe.impl == impl
    order, counts = sort_by_parts(j, slot_of, E, parts)
    n = int(counts.sum())
    packed = pe(x[order][:n], counts)  # [n, D] in (j, expert) order
    slot = segment_slots(j, order, counts)  # [R]
    assert (slot == parts * R).eq(j == 0).all()
    src = torch.zeros(parts * R + 1, dtype=torch.long).scatter_(0, slot, torch.arange(R))[: parts * R]
    segs = pe(x[src].view(parts, R, d), counts)  # P outputs [R, D], rows past each count undefined
    ran = (j > 0).nonzero().squeeze(1)
    got = torch.stack([segs[int(slot[c]) // R][int(slot[c]) % R] for c in ran])
    want = packed[torch.argsort(order)[ran]]  # packed row of each choice that ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_part_experts_with_reordered_neurons_compute_the_same_experts():
    ex, x = experts(), torch.randn(5, D)
    perm = torch.stack([torch.randperm(F) for _ in range(E)])
    full = part_experts(ex, 2, perm).full_experts()
    torch.testing.assert_close(per_expert(full, x), per_expert(ex, x), atol=1e-6, rtol=1e-5)


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
