import pytest
import torch

from moestack.moe.dispatch import LocalDispatcher
from moestack.moe.router import Router


def routing_for(T=12, E=4, k=2, seed=0):
    torch.manual_seed(seed)
    return Router(8, E, k)(torch.randn(T, 8))


def test_permute_combine_round_trip_is_weighted_sum():
    rt = routing_for()
    x = torch.randn(12, 8)
    disp = LocalDispatcher(4)
    d = disp.dispatch(x, rt).wait()
    assert d.counts.tolist() == rt.counts.tolist()
    # rows are grouped by expert in ascending order
    sorted_ids = rt.expert_ids.flatten()[d.order]
    assert torch.equal(sorted_ids, torch.sort(sorted_ids).values)
    y = disp.combine(d.x, d).wait()  # identity experts
    assert torch.allclose(y, x * rt.weights.sum(-1, keepdim=True), atol=1e-6)


def test_capacity_factor_drops_and_counts_overflow():
    T, E, k = 16, 4, 1
    rt = routing_for(T, E, k)
    rt.expert_ids = torch.zeros(T, 1, dtype=torch.long)  # everything to expert 0
    rt.counts = torch.tensor([T, 0, 0, 0])
    disp = LocalDispatcher(E, capacity_factor=1.0)  # capacity = 4
    d = disp.dispatch(torch.randn(T, 8), rt).wait()
    assert d.dropped == 12 and d.counts.tolist() == [4, 0, 0, 0] and d.x.shape[0] == 4
    y = disp.combine(d.x, d).wait()
    assert (y[4:] == 0).all() and (y[:4] != 0).any()  # the first 4 tokens kept, in order


def plain_round_trip(x, rt, order, weights, k):
    """The reference: autograd's own indexing and a zero-filled scatter (what the dispatcher replaces)."""
    T = x.shape[0]
    y = x[order // k] * 2.0  # a stand-in expert
    full = y.new_zeros(T * k, x.shape[1]).index_copy(0, order, y)
    return (full.view(T, k, -1) * weights.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("capacity", [0.0, 0.5])
def test_gather_based_dispatch_and_combine_match_plain_indexing_with_grads(capacity):
    T, E, k = 24, 4, 2
    rt = routing_for(T, E, k, seed=3)
    x = torch.randn(T, 8, requires_grad=True)
    weights = rt.weights.detach().clone().requires_grad_(True)
    rt.weights = weights
    disp = LocalDispatcher(E, capacity_factor=capacity)
    d = disp.dispatch(x, rt).wait()
    got = disp.combine(d.x * 2.0, d).wait()
    assert (d.dropped > 0) == (capacity > 0)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weights.detach().clone().requires_grad_(True)
    kept_w = w_ref if d.sent is None else w_ref * d.sent.view(T, k)
    want = plain_round_trip(x_ref, rt, d.order, kept_w, k)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weights.grad, w_ref.grad)


def test_a_non_finite_expert_row_stays_with_its_own_token():
    T, E, k = 8, 4, 2
    rt = routing_for(T, E, k, seed=1)
    rt.expert_ids = torch.tensor([[0, 1]] * T)  # everything to experts 0 and 1: capacity drops the rest
    rt.counts = torch.tensor([T, T, 0, 0])
    disp = LocalDispatcher(E, capacity_factor=1.0)  # capacity 4 per expert
    d = disp.dispatch(torch.randn(T, 8), rt).wait()
    y = d.x.clone()
    y[0] = float("inf")  # the row of the first kept choice (token 0)
    out = disp.combine(y, d).wait()
    assert not torch.isfinite(out[0]).all() and torch.isfinite(out[1:]).all()


@pytest.mark.triton
def test_fused_inference_combine_matches_the_autograd_path(triton_device):
    from moestack.moe.layer import MoELayer
    import moestack.moe.dispatch as dispatch

    torch.manual_seed(0)
    layer = MoELayer(64, 8, 2, 128, impl="grouped_mm").to(triton_device)
    x = torch.randn(300, 64, device=triton_device, requires_grad=True)
    with torch.no_grad():
        assert dispatch.fused_inference(x)
        fused = layer(x)[0]  # no gradient wanted: the Triton combine
    dispatch.TRITON_COMBINE[0] = False
    try:
        eager = layer(x)[0]  # autograd: unpermute's gathers and sums
    finally:
        dispatch.TRITON_COMBINE[0] = True
    torch.testing.assert_close(fused, eager.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("k, frozen_router", [(2, False), (8, False), (2, True)])
def test_training_combine_kernels_match_the_autograd_path(triton_device, k, frozen_router):
    """The dropless training combine (forward and backward) and the expansion's backward as Triton kernels give
    the gathers-and-sums path's output and every gradient: tokens, router gate (through the weights), experts.
    A frozen router: no weights' gradient is wanted (the combine then keeps no copy of the expert outputs)."""
    import copy

    from moestack.moe.layer import MoELayer
    import moestack.moe.dispatch as dispatch

    torch.manual_seed(0)
    layer = MoELayer(64, 16, k, 96, impl="grouped_mm", aux_loss_coef=0.0, z_loss_coef=0.0).to(triton_device)
    layer.router.requires_grad_(not frozen_router)
    x = torch.randn(150, 64, device=triton_device)
    g = torch.randn(150, 64, device=triton_device)
    outs = {}
    for fused in (True, False):
        net, xi = copy.deepcopy(layer), x.clone().requires_grad_(True)
        dispatch.TRITON_COMBINE[0] = fused
        try:
            y = net(xi)[0]
            (y * g).sum().backward()
        finally:
            dispatch.TRITON_COMBINE[0] = True
        outs[fused] = (y.detach(), xi.grad, net.router.gate.weight.grad, net.experts.w13.grad, net.experts.w2.grad)
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if frozen_router:
        assert outs[True][2] is None
    else:
        assert outs[True][2].abs().sum() > 0  # the router's gradient came through the weights' gradient


@pytest.mark.triton
@pytest.mark.parametrize("given_parts", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_segment_kernels_match_a_per_choice_reference(parts, given_parts, triton_device):
    from moestack.moe.rows_triton import combine_segments, parts_run, place_rows, plan_segments

    T, k, D, E = 9, 2, 1030, 3  # D spans two column blocks
    R = T * k
    g = torch.Generator().manual_seed(parts)
    x = torch.randn(T, D, generator=g).to(triton_device)
    w = torch.rand(T, k, generator=g).to(triton_device)
    ids = torch.randint(0, E, (T, k), generator=g).to(triton_device)
    scale = torch.rand(E, parts, generator=g).sort(dim=1, descending=True).values.to(triton_device)
    tau = 0.3
    j = (w.unsqueeze(-1) * scale[ids] >= tau).sum(-1).flatten()  # [R] parts each choice runs
    if given_parts:  # load-aware dropping hands in its own part counts
        j = torch.randint(0, parts + 1, (R,), generator=g).to(triton_device)
    assert 0 < int((j == 0).sum()) < R
    stats = torch.tensor([5, 0], device=triton_device)  # parts asked for, parts run
    key, counts = plan_segments(w.flatten(), ids.flatten(), scale, tau, stats, j if given_parts else None)
    want_key = torch.where(j > 0, (j - 1) * E + ids.flatten(), parts * E)
    assert torch.equal(key.long(), want_key) and torch.equal(counts.long(), torch.bincount(want_key, minlength=parts * E + 1))
    assert stats.tolist() == [5 + R * parts, int(j.sum())]
    if not given_parts:  # the fused decode path's planning: the same parts and counts, one kernel
        stats2 = torch.tensor([1, 2], device=triton_device)
        assert torch.equal(parts_run(w.flatten(), ids.flatten(), scale, tau, stats2).long(), j)
        assert stats2.tolist() == [1 + R * parts, 2 + int(j.sum())]
    seg, slot = place_rows(x, key, counts, E, parts, k)
    seg = seg.view(parts * R, D)
    ran_slots = slot[j > 0]
    assert ran_slots.unique().numel() == ran_slots.numel() and (slot[j == 0] == parts * R).all()
    per_group = counts[: parts * E].view(parts, E).long()
    ends = torch.cumsum(per_group, 1)  # [P, E] end of each expert's rows within its segment
    for c, s in enumerate(slot.tolist()):
        if j[c] > 0:  # segment j - 1, inside its expert's rows of that segment, holding its token row
            q, row, e = int(j[c]) - 1, s % R, int(ids.flatten()[c])
            assert s // R == q and ends[q, e] - per_group[q, e] <= row < ends[q, e]
            assert torch.equal(seg[s], x[c // k])
    y = [torch.randn(R, D, generator=g).to(triton_device) for _ in range(parts)]
    want = torch.zeros(T, D, device=triton_device)
    for c, s in enumerate(slot.tolist()):
        if s < parts * R:
            want[c // k] += w[c // k, c % k] * y[s // R][s % R]
    torch.testing.assert_close(combine_segments(y, slot, w), want)
    with pytest.raises(ValueError, match="up to 4 outputs"):
        combine_segments(y * 5, slot, w)
