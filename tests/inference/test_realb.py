"""ReaLB: the policy picks the planted ranks, FP8 / FP4 stay close to full precision, the conversion buffer
is reused, thresholds are validated, and under EP (2 gloo ranks) the decisions and outputs equal one process's."""

import pytest
import torch

from moestack.config import ParallelConfig
from moestack.inference.lowp import (FP8_MAX, cast_fp8, dequantize_fp8, fake_fp4, fp8_experts, fp8_grouped_mm,
                                    fp8_scales, quantize_fp8, swiglu_fp8)
from moestack.inference.realb import RealbConfig, apply_realb, choose_ranks, remove_realb, set_modality, summarize
from moestack.moe.experts import loop_mm
from moestack.moe.layer import MoELayer
from moestack.parallel.ep import shard_layer
from moestack.parallel.mesh import init_parallel, shutdown
from moestack.placement.placement import Placement
from tests.dist import run_ranks
from tests.inference.helpers import D, E, hidden_batches, moe_layer, tiny_model

ON = dict(load_ratio=1.0, modality=0.0, min_tokens=0, min_expert_rows=0)  # any above-mean rank goes low


@pytest.mark.parametrize("field,value,needle", [
    ("load_ratio", 0.9, "load_ratio"), ("modality", 1.5, "modality"), ("min_tokens", -1, "min_tokens"),
    ("min_tokens", 2.5, "min_tokens"), ("precision", "int4", "precision"), ("ranks", -2, "ranks"),
    ("min_expert_rows", -1, "min_expert_rows")])
def test_thresholds_are_validated(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        RealbConfig(**{field: value})


def test_policy_picks_the_overloaded_vision_rank():
    loads = torch.tensor([100, 300, 100, 100])
    cfg = RealbConfig(load_ratio=1.15, modality=0.7, min_tokens=2048, min_expert_rows=0)
    assert choose_ranks(loads, torch.tensor([10, 280, 90, 0]), 4096, cfg).tolist() == [False, True, False, False]
    # too few rows per local expert for FP8 to pay: 300 rows over 2 experts < 2 x 200
    rows_cfg = RealbConfig(load_ratio=1.15, min_tokens=2048, min_expert_rows=200)
    assert not choose_ranks(loads, torch.tensor([10, 280, 90, 0]), 4096, rows_cfg, experts_per_rank=2).any()
    assert choose_ranks(loads, torch.tensor([10, 280, 90, 0]), 4096, rows_cfg, experts_per_rank=1)[1]
    # the same load, but mostly text: stays BF16
    assert not choose_ranks(loads, torch.tensor([10, 150, 90, 0]), 4096, cfg).any()
    # a small batch: off
    assert not choose_ranks(loads, torch.tensor([10, 280, 90, 0]), 1024, cfg).any()
    # balanced: nobody is overloaded
    assert not choose_ranks(torch.tensor([100, 101, 99, 100]), torch.tensor([100, 101, 99, 100]), 4096, cfg).any()
    # two hot vision ranks
    got = choose_ranks(torch.tensor([300, 300, 50, 50]), torch.tensor([300, 250, 0, 0]), 4096, cfg)
    assert got.tolist() == [True, True, False, False]
    assert choose_ranks(loads, torch.zeros(4), 0, RealbConfig(everywhere=True)).all()


def test_fp8_quantization_is_rowwise_and_tight():
    torch.manual_seed(0)
    w = torch.randn(3, 64, 48) * torch.logspace(-2, 1, 48)  # columns of very different scales
    q, s = quantize_fp8(w, dim=-2, transpose=True)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 48, 64) and s.shape == (3, 48)
    torch.testing.assert_close(s, w.abs().amax(-2) / FP8_MAX)
    back = dequantize_fp8(q, s, -1).transpose(-2, -1)
    err = (back - w).abs() / w.abs().amax(-2, keepdim=True)
    assert err.max() < 2 ** -4 * 1.01  # half an e4m3 ulp at the top binade, relative to each column's scale
    x = torch.randn(10, 64)
    qx, sx = quantize_fp8(x, dim=-1)
    assert qx.shape == (10, 64) and sx.shape == (10,)
    out = torch.empty(10, 64, dtype=torch.float8_e4m3fn)
    scale = torch.empty(10)
    q2, s2 = quantize_fp8(x, dim=-1, out=out, scale=scale)
    assert q2.data_ptr() == out.data_ptr() and s2.data_ptr() == scale.data_ptr()
    assert torch.equal(q2.float(), qx.float())


def test_fp8_grouped_mm_is_close_to_full_precision():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 4])
    x, w = torch.randn(20, 32), torch.randn(4, 32, 16)
    q, s = quantize_fp8(w, dim=-2, transpose=True)
    got = fp8_grouped_mm(x, q, s, counts, torch.float32)
    want = loop_mm(x, w, counts.tolist())
    assert (got - want).norm() / want.norm() < 0.05
    assert (got - want).norm() / want.norm() > 0  # it really is a lower precision


def test_fake_fp4_uses_e2m1_values_in_blocks_of_16():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    y = fake_fp4(x, -1)
    assert y.shape == x.shape
    blocks = y.view(4, 4, 16)
    for blk in blocks.reshape(-1, 16):
        scale = blk.abs().max() / 6
        vals = (blk / scale).abs()
        grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
        assert torch.isclose(vals.unsqueeze(-1), grid, atol=1e-3).any(-1).all()  # every value on the grid
    rel = (y - x).norm() / x.norm()
    assert 0.02 < rel < 0.2  # coarser than fp8, still the same tensor
    with pytest.raises(ValueError, match="multiple of the block size"):
        fake_fp4(torch.randn(3, 20), -1)


def _layer_out(layer, x, vision=None):
    if vision is not None:
        set_modality(layer, vision)
    with torch.no_grad():
        return layer(x)[0]


def test_low_ranks_stay_close_and_the_rest_is_untouched():
    x = hidden_batches(1, tokens=64)[0]
    want = _layer_out(moe_layer(), x)
    layer = moe_layer()
    state = apply_realb(layer, RealbConfig(ranks=4, **ON))
    got = _layer_out(layer, x, torch.ones(64, dtype=torch.bool))
    (d,) = state.take_decisions()
    assert d["low_ranks"] and len(d["low_ranks"]) < 4 and sum(d["loads"]) == 64 * 2
    assert 0 < (got - want).norm() / want.norm() < 0.05
    # text tokens under the default modality threshold: nothing goes low, the output is bit-identical
    state.cfg = RealbConfig(ranks=4, load_ratio=1.0, min_tokens=0)
    assert torch.equal(_layer_out(layer, x, torch.zeros(64, dtype=torch.bool)), want)
    assert state.take_decisions()[0]["low_ranks"] == []
    # FP4 numerics on the same ranks (expert sizes multiples of 16): further from full precision than FP8
    errs = {}
    for precision in ("fp8", "fp4"):
        layer = _layer32()
        want = _layer_out(layer, x)
        apply_realb(layer, RealbConfig(ranks=4, precision=precision, **ON))
        errs[precision] = (_layer_out(layer, x, torch.ones(64, dtype=torch.bool)) - want).norm() / want.norm()
    assert 0 < errs["fp8"] < errs["fp4"] < 0.25


def _layer32():
    torch.manual_seed(0)
    layer = MoELayer(D, E, 2, 32, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
        layer.experts.w13.normal_(0, 0.3)
        layer.experts.w2.normal_(0, 0.3)
    return layer.eval()


def test_rows_outside_the_low_ranks_are_exact():
    """Only the chosen ranks' experts change: tokens routed to BF16 ranks only keep their exact outputs."""
    x = hidden_batches(1, tokens=64)[0]
    ref = moe_layer()
    want = _layer_out(ref, x)
    ids = ref.last_routing.expert_ids  # [T, k]
    layer = moe_layer()
    state = apply_realb(layer, RealbConfig(ranks=4, **ON))
    got = _layer_out(layer, x, torch.ones(64, dtype=torch.bool))
    low = torch.tensor(state.take_decisions()[0]["low_ranks"])
    rank = ids // (E // 4)
    untouched = ~torch.isin(rank, low).any(-1)
    assert untouched.any() and (~untouched).any()
    torch.testing.assert_close(got[untouched], want[untouched], atol=1e-6, rtol=1e-6)


def test_conversion_buffer_is_reused_over_layers_and_steps():
    model = tiny_model(**{"model.n_layers": 3, "moe.num_experts": 8})
    state = apply_realb(model, RealbConfig(ranks=8, **ON))  # 1..7 ranks lowered per layer: varying sizes
    idx = torch.randint(0, 256, (4, 16))
    ptrs = set()
    for _ in range(5):
        with torch.no_grad():
            model(idx)
        ptrs |= {t["q13"].data_ptr() for t in state.buffer.tensors.values()}
    decisions = state.take_decisions()
    stats = summarize(decisions)
    assert stats["realb_layers"] == 15 and stats["realb_low_layers"] > 0
    assert len({len(d["low_ranks"]) for d in decisions}) > 1  # layers lowered different numbers of experts
    assert state.buffer.allocations == 1 and len(ptrs) == 1


def test_scmoe_layers_each_run_their_own_fp8_weights(monkeypatch):
    """ScMoE starts block i+1's dispatch (and its conversion) before block i's experts run; with two buffers
    each layer still runs its own weights: the model equals one whose every layer quantizes on the fly."""
    import moestack.moe.experts as experts_mod
    from moestack.inference.lowp import fp8_grouped_mm as mm8

    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model(**{"model.arch": "scmoe", "model.n_layers": 3, "moe.num_experts": 4})
    state = apply_realb(model, RealbConfig(everywhere=True, min_tokens=0))
    with torch.no_grad():
        got = model(idx)[0]
    assert state.slots == 2 and state.buffer.allocations == 2

    def on_the_fly(self, x, counts, w13, w2):  # FP8 of this layer's own weights, quantized right here
        q13, s13 = quantize_fp8(w13.detach(), dim=-2, transpose=True)
        q2, s2 = quantize_fp8(w2.detach(), dim=-2, transpose=True)
        return mm8(experts_mod.swiglu(mm8(x, q13, s13, counts, torch.float32)).contiguous(), q2, s2, counts,
                   torch.float32)

    ref = tiny_model(**{"model.arch": "scmoe", "model.n_layers": 3, "moe.num_experts": 4})
    monkeypatch.setattr(experts_mod.GroupedExperts, "run", on_the_fly)
    with torch.no_grad():
        want = ref(idx)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_modality_mask_and_double_install_are_clear_errors():
    layer = moe_layer()
    apply_realb(layer, RealbConfig(ranks=4, **ON))
    set_modality(layer, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="modality mask has 10 entries"):
        _layer_out(layer, hidden_batches(1, tokens=64)[0])
    with pytest.raises(ValueError, match="already installed"):
        apply_realb(layer)
    with pytest.raises(ValueError, match="do not divide"):
        l2 = moe_layer()
        apply_realb(l2, RealbConfig(ranks=3, **ON))
        _layer_out(l2, hidden_batches(1, tokens=64)[0])
    with pytest.raises(ValueError, match="not installed"):
        set_modality(moe_layer(), None)


def test_remove_realb_restores_the_layers():
    x = hidden_batches(1, tokens=64)[0]
    layer = moe_layer()
    want = _layer_out(layer, x)
    experts, dispatcher = layer.experts, layer.dispatcher
    apply_realb(layer, RealbConfig(ranks=4, **ON))
    assert not torch.equal(_layer_out(layer, x, torch.ones(64, dtype=torch.bool)), want)
    remove_realb(layer)
    assert layer.experts is experts and layer.dispatcher is dispatcher and not hasattr(layer, "realb")
    assert torch.equal(_layer_out(layer, x), want)


T = 32


def _check_ep(rank, world):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    x_all = hidden_batches(1, tokens=world * T, seed=3)[0]
    vision = torch.arange(world * T) % 3 != 0
    ref = moe_layer()
    ref_state = apply_realb(ref, RealbConfig(ranks=world, **ON))
    want = _layer_out(ref, x_all, vision)[rank * T:(rank + 1) * T]
    want_d = ref_state.take_decisions()
    assert want_d[0]["low_ranks"]
    layer = moe_layer()
    row = [e * world // E for e in range(E)]
    layer.dispatcher = shard_layer(layer, ctx, Placement(world, [row]), 0)
    state = apply_realb(layer, RealbConfig(**ON))
    got = _layer_out(layer, x_all[rank * T:(rank + 1) * T], vision[rank * T:(rank + 1) * T])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    d = state.take_decisions()
    assert d[0]["loads"] == want_d[0]["loads"] and d[0]["low_ranks"] == want_d[0]["low_ranks"]
    assert layer.experts.w13.shape[0] == E // world
    shutdown(ctx)


def test_under_ep_each_rank_decides_as_one_process_does():
    run_ranks(_check_ep, 2)


@pytest.mark.triton
def test_triton_quantize_kernel_matches_torch(triton_device):
    from moestack.inference.lowp_triton import quantize_fp8_triton

    dev = triton_device
    torch.manual_seed(0)
    for x, dim, tr in ((torch.randn(3, 96, 80, device=dev), -2, True), (torch.randn(37, 96, device=dev), -1, False)):
        q, s = quantize_fp8_triton(x, dim, None, None, tr)
        amax = x.abs().amax(dim)
        torch.testing.assert_close(s, amax / FP8_MAX)
        want = (x / s.unsqueeze(dim)).to(torch.float8_e4m3fn)
        if tr:
            want = want.transpose(-2, -1)
        assert q.shape == want.shape
        same = (q.float() == want.float()).float().mean()
        # on a GPU the cast rounds exactly as torch's; Triton's CPU interpreter mis-rounds some fp8 casts
        assert same == 1.0 if dev == "cuda" else same > 0.95


@pytest.mark.triton
def test_weight_kernel_handles_ragged_sizes(triton_device):
    """The weight quantizer (column abs-max, then the cast kernel) at sizes that are not multiples of its tiles,
    into reused buffers; its scales equal the CPU reference's bit for bit."""
    from moestack.inference.lowp_triton import quantize_fp8_triton

    torch.manual_seed(0)
    w = torch.randn(2, 200, 40) * torch.logspace(-2, 1, 40)
    q, s = quantize_fp8_triton(w.to(triton_device), -2, torch.empty(2, 40, 200, dtype=torch.float8_e4m3fn,
                               device=triton_device), torch.empty(2, 40, device=triton_device), True)
    qc, sc = quantize_fp8(w, dim=-2, transpose=True)
    torch.testing.assert_close(s.cpu(), sc, rtol=0, atol=0)
    assert q.shape == qc.shape and (q.cpu().float() == qc.float()).float().mean() > 0.95


@pytest.mark.triton
def test_cast_with_kept_scales_equals_quantize(triton_device):
    """Converting with the weights' kept scales (ReaLB's conversion) writes what quantizing them afresh does."""
    from moestack.inference.lowp_triton import cast_fp8_triton, quantize_fp8_triton

    torch.manual_seed(0)
    w = (torch.randn(3, 96, 80) * 0.05).to(triton_device)
    q, s = quantize_fp8_triton(w, -2, None, None, True)
    got = cast_fp8_triton(w, s, -2, torch.empty_like(q), True)
    assert torch.equal(got.cpu().float(), q.cpu().float())
    # and the CPU fallback, against the CPU quantize
    qc, sc = quantize_fp8(w.cpu(), dim=-2, transpose=True)
    torch.testing.assert_close(fp8_scales(w.cpu(), -2), sc, rtol=0, atol=0)
    assert torch.equal(cast_fp8(w.cpu(), sc, -2, transpose=True).float(), qc.float())


@pytest.mark.triton
def test_swiglu_straight_to_fp8_equals_swiglu_then_quantize(triton_device):
    from moestack.inference.lowp_triton import quantize_fp8_triton, swiglu_fp8_triton
    from moestack.moe.swiglu_triton import swiglu_fwd

    torch.manual_seed(0)
    h = (torch.randn(37, 2 * 96) * 3).to(triton_device)
    q, s = swiglu_fp8_triton(h)
    want_q, want_s = quantize_fp8_triton(swiglu_fwd(h, 1), -1, None, None, False)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    assert q.shape == (37, 96) and torch.equal(q.cpu().float(), want_q.cpu().float())
    # the CPU fallback is swiglu then quantize_fp8, the reference: the kernel is within fp8 rounding of it
    ref_q, ref_s = swiglu_fp8(h.cpu())
    torch.testing.assert_close(s.cpu(), ref_s, rtol=1e-6, atol=0)
    assert (q.cpu().float() == ref_q.float()).float().mean() > 0.95


def test_tokens_quantized_once_before_the_dispatch_change_nothing(monkeypatch):
    """On one process the dispatcher quantizes each token once ([T, D], not one row per routed copy) and the
    low experts gather their fp8 rows: the layer's output is bit-equal to quantizing the dispatched rows."""
    import moestack.inference.realb as realb_mod

    x = hidden_batches(1, tokens=64)[0]
    vision = torch.ones(64, dtype=torch.bool)
    shapes = []
    real = realb_mod.quantize_fp8
    monkeypatch.setattr(realb_mod, "quantize_fp8", lambda t, **kw: shapes.append(tuple(t.shape)) or real(t, **kw))
    outs = []
    for everywhere in (False, True):  # the mixed path (some ranks low) and every expert low
        layer = _layer32()
        apply_realb(layer, RealbConfig(ranks=4, everywhere=everywhere, **ON))
        got = _layer_out(layer, x, vision)
        monkeypatch.setattr(realb_mod._TokensFp8, "wait", lambda self: self.inner.wait())  # rows quantized later
        layer2 = _layer32()
        apply_realb(layer2, RealbConfig(ranks=4, everywhere=everywhere, **ON))
        want = _layer_out(layer2, x, vision)
        monkeypatch.undo()
        monkeypatch.setattr(realb_mod, "quantize_fp8", lambda t, **kw: shapes.append(tuple(t.shape)) or real(t, **kw))
        assert torch.equal(got, want)
        outs.append(got)
    assert shapes and all(sh == (64, D) for sh in shapes)  # tokens, never the 128 routed rows
    assert not torch.equal(outs[0], outs[1])


def test_fp8_experts_take_prequantized_rows():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 4])
    x, w13, w2 = torch.randn(20, 32), torch.randn(4, 32, 48) * 0.2, torch.randn(4, 24, 32) * 0.2
    q13, s13 = quantize_fp8(w13, dim=-2, transpose=True)
    q2, s2 = quantize_fp8(w2, dim=-2, transpose=True)
    want = fp8_experts(x, counts, q13, s13, q2, s2, torch.float32)
    xq, xs = quantize_fp8(x, dim=-1)
    assert torch.equal(fp8_experts(xq, counts, q13, s13, q2, s2, torch.float32, xs), want)
    with pytest.raises(ValueError, match="row scales"):
        fp8_grouped_mm(xq, q13, s13, counts, torch.float32)


def test_weight_scales_are_kept_until_the_weights_change():
    x, vision = hidden_batches(1, tokens=64)[0], torch.ones(64, dtype=torch.bool)
    layer = _layer32()
    apply_realb(layer, RealbConfig(ranks=4, everywhere=True, min_tokens=0))
    first = _layer_out(layer, x, vision)
    kept = layer.experts.scales
    assert torch.equal(_layer_out(layer, x, vision), first) and layer.experts.scales is kept  # not recomputed
    with torch.no_grad():
        layer.experts.w13.mul_(2.0)  # an in-place update (load_state_dict copies in place too)
    got = _layer_out(layer, x, vision)
    assert layer.experts.scales is not kept
    torch.testing.assert_close(layer.experts.scales["s13"], kept["s13"] * 2, rtol=0, atol=0)
    fresh = _layer32()
    with torch.no_grad():
        fresh.experts.w13.mul_(2.0)
    apply_realb(fresh, RealbConfig(ranks=4, everywhere=True, min_tokens=0))
    assert torch.equal(got, _layer_out(fresh, x, vision))


def test_command_line_spec():
    from moestack.inference.realb import parse_realb

    assert parse_realb("") == RealbConfig()
    cfg = parse_realb("ranks=4, load_ratio=1.3,precision=fp4,everywhere=true")
    assert (cfg.ranks, cfg.load_ratio, cfg.precision, cfg.everywhere) == (4, 1.3, "fp4", True)
    for bad, needle in (("bogus=1", "KEY=VALUE"), ("ranks", "KEY=VALUE"), ("ranks=x", "not a valid int"),
                        ("modality=2", "modality")):
        with pytest.raises(ValueError, match=needle):
            parse_realb(bad)


def _fp8_gpu():
    from moestack.inference import lowp

    if not (torch.cuda.is_available() and lowp.fp8_supported(torch.device("cuda"))):
        pytest.skip("needs an FP8 (compute capability 9.x) GPU")


@pytest.mark.gpu
def test_gpu_weight_quantization_equals_the_cpu_one():
    _fp8_gpu()
    torch.manual_seed(0)
    w = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    q, s = quantize_fp8(w, dim=-2, transpose=True)  # the Triton kernels on CUDA
    qc, sc = quantize_fp8(w.cpu().float(), dim=-2, transpose=True)  # torch ops on the CPU
    torch.testing.assert_close(s.cpu(), sc, rtol=0, atol=0)
    same = (q.cpu().float() == qc.float()).float().mean().item()
    assert same == 1.0, f"{same:.6f} of the fp8 values agree"


@pytest.mark.gpu
def test_scaled_grouped_mm_matches_the_emulation_on_the_gpu():
    """On Hopper the FP8 path is torch._scaled_grouped_mm; it computes what the CPU emulation computes."""
    _fp8_gpu()
    torch.manual_seed(0)
    counts = torch.tensor([40, 0, 88, 32], device="cuda")
    x = torch.randn(160, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    q, s = quantize_fp8(w, dim=-2, transpose=True)
    got = fp8_grouped_mm(x, q, s, counts, torch.bfloat16).float().cpu()
    want = fp8_grouped_mm(x.cpu().float(), q.cpu(), s.cpu(), counts.cpu(), torch.float32)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e} (bf16 output rounding and fast accumulation only)"


@pytest.mark.gpu
def test_realb_layer_on_the_gpu_is_close_to_its_cpu_twin():
    """A whole layer with the conversion on the side stream and some ranks lowered, against the same ReaLB layer
    emulated on the CPU (the same fp8 values; the GPU adds bf16 GEMM outputs and fast accumulation)."""
    _fp8_gpu()
    x, vision = hidden_batches(1, tokens=64)[0], torch.ones(64, dtype=torch.bool)
    cpu = _layer32()
    apply_realb(cpu, RealbConfig(ranks=4, **ON))
    want = _layer_out(cpu, x, vision)
    gpu = _layer32().cuda()
    state = apply_realb(gpu, RealbConfig(ranks=4, **ON))
    got = _layer_out(gpu, x.cuda(), vision.cuda())
    assert 0 < len(state.take_decisions()[0]["low_ranks"]) < 4  # the mixed path: some ranks low, some not
    err = ((got.cpu() - want).norm() / want.norm()).item()
    assert err < 1e-2, f"relative error {err:.3e}"


@pytest.mark.gpu
def test_gpu_swiglu_fp8_and_kept_scale_cast_equal_their_references():
    """On the H200: SwiGLU straight to fp8 equals the SwiGLU kernel then the row quantizer, bit for bit, and
    the kept-scale weight cast equals quantizing afresh."""
    _fp8_gpu()
    from moestack.moe.swiglu_triton import swiglu_fwd

    torch.manual_seed(0)
    h = torch.randn(300, 2 * 768, device="cuda", dtype=torch.bfloat16) * 2
    q, s = swiglu_fp8(h)
    want_q, want_s = quantize_fp8(swiglu_fwd(h, 1), dim=-1)
    assert torch.equal(s, want_s), "row scales differ"
    same = (q.float() == want_q.float()).float().mean().item()
    assert same == 1.0, f"{same:.6f} of the fp8 values agree"
    w = torch.randn(4, 256, 384, device="cuda", dtype=torch.bfloat16) * 0.05
    qw, sw = quantize_fp8(w, dim=-2, transpose=True)
    assert torch.equal(fp8_scales(w, -2), sw), "kept scales differ from the kernel's"
    assert torch.equal(cast_fp8(w, sw, -2, transpose=True).float(), qw.float())
