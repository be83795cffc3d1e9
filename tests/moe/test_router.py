import importlib
import math

import pytest
import torch

from moestack.moe.router import Router


def make_router(E=4, k=2, **kw):
    torch.manual_seed(0)
    return Router(8, E, k, **kw)


def test_topk_ids_and_weights_match_hand_computation():
    r = make_router(renormalize=False, aux_loss_coef=0, z_loss_coef=0)
    x = torch.randn(5, 8)
    out = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    for t in range(5):
        order = sorted(range(4), key=lambda e: -probs[t, e].item())[:2]
        assert out.expert_ids[t].tolist() == order
        assert torch.allclose(out.weights[t], probs[t, order])
    assert out.counts.tolist() == torch.bincount(out.expert_ids.flatten(), minlength=4).tolist()


def test_renormalised_weights_sum_to_one():
    out = make_router(renormalize=True)(torch.randn(7, 8))
    assert torch.allclose(out.weights.sum(-1), torch.ones(7))


def test_aux_and_z_loss_values_by_hand():
    r = make_router(E=4, k=1, aux_loss_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(6, 8)
    out = r(x)
    logits = x @ r.gate.weight.T
    probs = logits.softmax(-1)
    top1 = probs.argmax(-1)
    f = torch.tensor([(top1 == e).float().mean().item() for e in range(4)])
    P = probs.mean(0)
    assert math.isclose(out.aux_loss.item(), 0.5 * 4 * (f * P).sum().item(), rel_tol=1e-5)
    z = torch.logsumexp(logits, -1).square().mean()
    assert math.isclose(out.z_loss.item(), 0.25 * z.item(), rel_tol=1e-5)


def test_aux_loss_is_low_when_balanced_and_high_when_collapsed():
    r = make_router(E=4, k=1, aux_loss_coef=1.0, z_loss_coef=0)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[torch.arange(4), torch.arange(4)] = 20.0  # token with feature e hot -> expert e
    even = r(torch.eye(8)[:4].repeat(2, 1))  # two tokens per expert, peaked probabilities
    assert even.counts.tolist() == [2, 2, 2, 2]
    assert math.isclose(even.aux_loss.item(), 1.0, rel_tol=1e-4)  # E * sum(1/E * 1/E)
    collapsed = r(torch.eye(8)[:1].repeat(8, 1))  # every token to expert 0, with P_0 ~ 1
    assert collapsed.counts.tolist() == [8, 0, 0, 0]
    assert math.isclose(collapsed.aux_loss.item(), 4.0, rel_tol=1e-4)  # E * f_0 * P_0 = 4


def test_bias_balancing_changes_selection_not_weights():
    r = make_router(E=4, k=1, bias_balancing=True, renormalize=False)
    x = torch.randn(16, 8)
    before = r(x)
    r.update_bias(torch.tensor([100, 0, 0, 0]), rate=1.0)  # expert 0 overloaded
    assert r.expert_bias.tolist() == [-1.0, 1.0, 1.0, 1.0]
    after = r(x)
    assert (after.expert_ids == 0).sum() == 0
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    assert torch.allclose(after.weights, probs.gather(-1, after.expert_ids))
    assert not torch.equal(before.expert_ids, after.expert_ids)


def test_no_tokens_give_zero_losses_not_nan():
    """An EP rank can receive no tokens: its z-loss is 0 (a mean over nothing), not NaN."""
    router = Router(8, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001)
    rt = router(torch.zeros(0, 8))
    assert rt.expert_ids.shape == (0, 2) and rt.z_loss.item() == 0.0 and torch.isfinite(rt.aux_loss)


@pytest.mark.triton
@pytest.mark.parametrize("E, k, renormalize, bias, fp32", [(8, 2, True, False, True), (64, 8, False, False, False),
                                                           (6, 1, True, False, True), (128, 8, True, True, False),
                                                           (5, 3, False, True, True)])
def test_fused_topk_routes_as_the_eager_router(triton_device, E, k, renormalize, bias, fp32):
    """The serving router's one Triton kernel (softmax, top-k, weights, counts) gives the eager router's routing."""
    importlib.import_module("moestack.moe.router_triton")
    torch.manual_seed(3)
    r = Router(16, E, k, renormalize=renormalize, aux_loss_coef=0, z_loss_coef=0, bias_balancing=bias)
    r.logits_in_fp32 = fp32
    if bias:
        r.expert_bias.copy_(torch.randn(E) * 0.05)
    r = r.to(triton_device)
    x = torch.randn(37, 16, device=triton_device)
    with torch.no_grad():
        ref = r(x)
        r.fused_topk = True
        got = r(x)
    assert torch.equal(got.expert_ids, ref.expert_ids)
    assert torch.allclose(got.weights, ref.weights, atol=1e-6)
    assert torch.equal(got.counts, ref.counts) and got.counts.sum() == 37 * k
    assert got.aux_loss.item() == 0 and got.z_loss.item() == 0 and got.plan is None


@pytest.mark.triton
@pytest.mark.parametrize("T, E, k, block_m, bias, D, fp32", [
    (8, 128, 8, 16, False, 16, True), (37, 16, 2, 16, True, 16, True), (1, 6, 1, 4, False, 16, True),
    (13, 64, 8, 16, False, 16, True), (3, 5, 3, 2, True, 16, True),
    (8, 128, 8, 16, False, 300, False), (5, 6, 2, 4, True, 16, False), (64, 64, 8, 16, False, 256, False)])
def test_topk_plan_routes_and_plans_as_topk_then_align(triton_device, T, E, k, block_m, bias, D, fp32):
    """The decode router's kernel with the fused MoE's plan: the routing of the top-k kernel and the plan of
    `fused.align` (entries sorted by expert in token order, blocks padded with the sentinel, block experts).
    Logits in fp32 (the gate too) or in the model's dtype."""
    from moestack.moe import fused
    from moestack.moe.router import plan_rows

    importlib.import_module("moestack.moe.fused_triton")
    r = Router(D, E, k, renormalize=True, aux_loss_coef=0, z_loss_coef=0, bias_balancing=bias)
    r.logits_in_fp32 = fp32
    if bias:
        r.expert_bias.copy_(torch.randn(E) * 0.05)
    r = r.to(triton_device)
    r.fused_topk = True
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(triton_device)
    with torch.no_grad():
        ref, got = r(x), r(x, plan_block_m=block_m)
    assert torch.equal(got.expert_ids, ref.expert_ids) and torch.equal(got.counts, ref.counts)
    assert torch.allclose(got.weights, ref.weights, atol=1e-6)
    want = fused.align(ref.expert_ids.flatten(), E, block_m)
    sorted_ids, block_expert, total = got.plan
    assert sorted_ids.numel() == plan_rows(T * k, E, block_m) == want.sorted_ids.numel()
    assert torch.equal(total, want.total) and torch.equal(sorted_ids, want.sorted_ids)
    used = int(total) // block_m  # blocks past the padded total do nothing: their expert is any
    assert torch.equal(block_expert[:used], want.block_expert[:used])


@pytest.mark.triton
def test_fused_topk_keeps_nan_rows_in_range(triton_device):
    """A row of NaN logits still gets expert ids below E and counts nothing out of range."""
    rt = importlib.import_module("moestack.moe.router_triton")
    logits = torch.randn(3, 6)
    logits[1, 2] = float("nan")
    ids, _, counts = rt.topk_softmax(logits.to(triton_device), 2, True)
    assert int(ids.max()) < 6 and counts.numel() == 6


@pytest.mark.triton
def test_topk_plan_gives_nan_rows_distinct_experts_and_rows(triton_device):
    """A row of NaN logits takes k distinct experts (its lowest), so every one of its entries gets a plan row."""
    rt = importlib.import_module("moestack.moe.router_triton")
    importlib.import_module("moestack.moe.fused_triton")
    logits = torch.randn(3, 6)
    logits[1, 2] = float("nan")
    ids, _, counts, (sorted_ids, _, total) = rt.topk_plan(logits.to(triton_device), 3, True, None, 4, 24)
    assert ids[1].tolist() == [0, 1, 2] and len(set(ids[0].tolist())) == 3
    assert int(counts.sum()) == 9
    placed = sorted(i for i in sorted_ids[: int(total)].tolist() if i < 9)
    assert placed == list(range(9))
    assert counts.tolist() == torch.bincount(ids.flatten().cpu(), minlength=6).tolist()
