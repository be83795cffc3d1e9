import pytest
import torch
import torch.nn.functional as F

from moestack.moe.layer import MoELayer


def dense_reference(layer, x):
    """Every expert on every token, masked by the routing: obviously correct and slow."""
    logits = x.float() @ layer.router.gate.weight.float().T
    probs = logits.softmax(-1)
    w, ids = probs.topk(layer.router.top_k, -1)
    if layer.router.renormalize:
        w = w / w.sum(-1, keepdim=True)
    ex = layer.experts
    out = torch.zeros_like(x)
    for e in range(ex.num_experts):
        gate, up = (x @ ex.w13[e]).chunk(2, -1)
        ye = (F.silu(gate) * up) @ ex.w2[e]  # [T, D]
        weight = (w * (ids == e)).sum(-1, keepdim=True)
        out = out + weight * ye
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_layer_matches_dense_reference_outputs_and_grads(impl, shared):
    torch.manual_seed(0)
    layer = MoELayer(16, 6, 2, 24, impl=impl, shared_experts=shared, aux_loss_coef=0, z_loss_coef=0)
    x = torch.randn(20, 16, requires_grad=True)
    y, _ = layer(x)
    xr = x.detach().clone().requires_grad_()
    ref = dense_reference(layer, xr)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(y, [x] + params, g, allow_unused=True)
    want = torch.autograd.grad(ref, [xr] + params, g, allow_unused=True)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_records_tokens_per_expert():
    layer = MoELayer(16, 4, 2, 8)
    layer(torch.randn(10, 16))
    layer(torch.randn(5, 16))
    assert layer.tokens_seen.sum().item() == 30


def test_moe_layer_matches_hf_mixtral_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(cfg).float()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = MoELayer(32, 8, 2, 48, aux_loss_coef=0, z_loss_coef=0)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w13.copy_(hf.experts.gate_up_proj.transpose(1, 2))
        ours.experts.w2.copy_(hf.experts.down_proj.transpose(1, 2))
    x = torch.randn(2, 7, 32)
    want = hf(x)
    want = want[0] if isinstance(want, tuple) else want
    got, _ = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_experts_run_in_the_autocast_dtype():
    """The residual stream is fp32 under autocast; the MoE rows travel and the experts compute in bf16."""
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 24, aux_loss_coef=0.0, z_loss_coef=0.0)
    seen = []
    layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(32, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert seen == [torch.bfloat16]
    y.float().sum().backward()  # the cast is differentiable: fp32 gradients reach the fp32 input
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    want, _ = layer(x.detach())  # fp32 without autocast, the same routing (fp32 router logits either way)
    torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.05)
    assert seen[-1] == torch.float32


def test_bad_layer_input_is_one_clear_error():
    layer = MoELayer(16, 4, 2, 24)
    with pytest.raises(ValueError, match=r"hidden size 16 \(\[\.\.\., 16\]\), got shape \(4, 8\)"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoELayer(16, 4, 5, 24)
    experts = MoELayer(16, 4, 2, 24, impl="loop").experts
    with pytest.raises(ValueError, match="counts sum to 8 rows but x has 10"):
        experts(torch.randn(10, 16), torch.tensor([2, 2, 2, 2]))
