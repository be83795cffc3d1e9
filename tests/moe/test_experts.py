import pytest
import torch
import torch.nn.functional as F

from moestack.moe.experts import GroupedExperts


def per_expert_reference(ex, x, counts):
    outs = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        gate, up = (xe @ ex.w13[e]).chunk(2, -1)
        outs.append((F.silu(gate) * up) @ ex.w2[e])
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_grouped_experts_match_python_loop_with_empty_experts(impl):
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 32, impl=impl)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    y = ex(x, counts)
    ref_x = x.detach().clone().requires_grad_()
    ref = per_expert_reference(ex, ref_x, counts)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    gx, gw13, gw2 = torch.autograd.grad(y, (x, ex.w13, ex.w2), g)
    rx, rw13, rw2 = torch.autograd.grad(ref, (ref_x, ex.w13, ex.w2), g)
    for a, b in ((gx, rx), (gw13, rw13), (gw2, rw2)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parts", [1, 2])
def test_swiglu_matches_silu_gate_times_up(parts):
    from moestack.moe.experts import swiglu

    h = torch.randn(5, parts * 2 * 3)
    per_part = h.view(5, parts, 2, 3)
    want = (torch.nn.functional.silu(per_part[:, :, 0]) * per_part[:, :, 1]).reshape(5, -1)
    torch.testing.assert_close(swiglu(h, parts), want)
    assert swiglu(h[:0], parts).shape == (0, parts * 3)  # no rows (an EP rank that received none)


def test_dense_swiglu_module_takes_empty_batches():
    from moestack.moe.experts import SwiGLU

    ffn = SwiGLU(8, 12)
    assert ffn(torch.zeros(0, 8)).shape == (0, 8) and ffn(torch.zeros(2, 0, 8)).shape == (2, 0, 8)



@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_triton_swiglu_matches_eager_forward_and_backward(parts, dtype, triton_device):
    import moestack.moe.experts as mod

    torch.manual_seed(0)
    n = 300 if triton_device == "cuda" else 20  # the interpreter runs each program in Python
    h = torch.randn(n, parts * 2 * 1040, device=triton_device, dtype=dtype)  # rows span two column blocks
    grad = torch.randn(n, parts * 1040, device=triton_device, dtype=dtype)
    outs, grads = [], []
    for impl in ("triton", "eager"):
        mod.SWIGLU_IMPL = impl
        try:
            hh = h.clone().requires_grad_()
            out = mod.swiglu(hh, parts)
            out.backward(grad)
        finally:
            mod.SWIGLU_IMPL = "auto"
        outs.append(out.float())
        grads.append(hh.grad.float())
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    with torch.no_grad():  # rows: only the leading rows are computed, the rest left as they were
        out = mod.swiglu(h, parts, rows=torch.tensor([7], device=triton_device))
    torch.testing.assert_close(out[:7].float(), outs[1][:7], **tol)
    assert mod._use_triton(h)
