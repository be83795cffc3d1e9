"""DualSparse on moestack models: exact at zero drop, calibrated drop rates, rows really removed, baselines."""

import pytest
import torch

from moestack.inference.dropping import (
    RATE_BITS,
    DualSparseDispatcher,
    keep_whole_subexperts,
    quantized_rate,
    work_per_expert,
)
from moestack.inference.dualsparse import (
    drop_stats,
    moe_layers,
    naive_drop,
    reset_drop_stats,
    set_drop_rate,
    sparsify,
)
from moestack.inference.partition import PartExperts
from tests.inference.helpers import E, K, RowCounter, hidden_batches, moe_layer, tiny_model, token_batches


@pytest.mark.parametrize("arch", ["top2", "shared_top1", "scmoe"])
@pytest.mark.parametrize("parts", [2, 4])
def test_zero_drop_keeps_the_logits_of_a_moestack_model(arch, parts):
    model, x = tiny_model(**{"model.arch": arch}), token_batches(1, seed=9)[0]
    with torch.no_grad():
        want = model(x)[0]
        sparsify(model, token_batches(2), drop_rate=0.0, parts=parts)
        got = model(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert drop_stats(model)["skipped"] == 0


@pytest.mark.parametrize("reconstruct", [True, False])
def test_sparsify_swaps_the_experts_and_dispatcher_seams(reconstruct):
    model = sparsify(tiny_model(), token_batches(2), drop_rate=0.25, reconstruct=reconstruct)
    for layer in moe_layers(model):
        assert type(layer.experts) is PartExperts and layer.experts.num_experts == 4 and layer.experts.parts == 2
        assert isinstance(layer.dispatcher, DualSparseDispatcher)
    assert any(k.endswith("dispatcher.scale") for k in model.state_dict())


def test_reconstruction_puts_the_major_neurons_in_the_first_part():
    layer, calib = moe_layer(), hidden_batches(4)
    plain = sparsify(moe_layer(), calib, 0.0, reconstruct=False).dispatcher.scale  # [E, 2]
    rebuilt = sparsify(layer, calib, 0.0).dispatcher.scale
    assert (rebuilt[:, 0] > rebuilt[:, 1]).all()
    torch.testing.assert_close(rebuilt.sum(1), plain.sum(1), rtol=1e-5, atol=1e-6)  # same neurons, regrouped
    assert (rebuilt[:, 0] / rebuilt.sum(1)).mean() > (plain[:, 0] / plain.sum(1)).mean() + 0.05


def test_reconstruction_preserves_the_layer_at_zero_drop():
    layer, x = moe_layer(), hidden_batches(1, seed=7)[0]
    with torch.no_grad():
        want = layer(x)[0]
        got = sparsify(layer, hidden_batches(3), 0.0)(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4, 0.5])
def test_achieved_drop_rate_is_close_to_the_target(rate):
    layer = sparsify(moe_layer(), hidden_batches(8, tokens=128), rate)
    with torch.no_grad():
        for x in hidden_batches(4, tokens=128, seed=3):  # held-out tokens
            layer(x)
    assert drop_stats(layer)["drop_rate"] == pytest.approx(rate, abs=0.04)


def test_dropped_rows_never_reach_the_grouped_gemm():
    layer, x = sparsify(moe_layer(), hidden_batches(4), 0.0), hidden_batches(1, seed=5)[0]
    with RowCounter(layer.experts) as counter, torch.no_grad():
        layer(x)
        set_drop_rate(layer, 0.4)
        reset_drop_stats(layer)
        dropped = layer(x)[0]
    choices = x.shape[0] * K
    st = drop_stats(layer)
    counts = layer.dispatcher.last_counts  # [P, E] rows running 1 or 2 parts
    assert counter.rows == [choices, int(counts.sum())] and counts.sum() < choices  # whole choices dropped
    assert int(work_per_expert(counts).sum()) == 2 * choices - st["skipped"] and st["skipped"] > 0.3 * 2 * choices
    assert torch.isfinite(dropped).all()


def test_each_choice_runs_a_prefix_of_its_parts():
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3, reconstruct=False)  # parts re-ordered by size
    assert (layer.dispatcher.scale[:, 0] >= layer.dispatcher.scale[:, 1]).all()
    keep = layer.dispatcher.keep(layer.router(hidden_batches(1, seed=5)[0])).view(-1, 2)
    assert not (keep[:, 1] & ~keep[:, 0]).any()  # a kept minor part implies a kept major part


def test_dropping_skips_the_smallest_contributions_first():
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3)
    disp, x = layer.dispatcher, hidden_batches(1, seed=5)[0]
    routing = layer.router(x)
    keep = disp.keep(routing).view(x.shape[0], K, 2)
    score = routing.weights.unsqueeze(-1) * disp.scale[routing.expert_ids]  # [T, k, P]
    assert score[keep].min() >= score[~keep].max()
    assert keep[..., 0].float().mean() > keep[..., 1].float().mean()  # minor parts drop first


def greedy_whole_reference(score, sub, num_subs, rate):
    """One step's whole sub-expert drops, slowly: sub-experts by ascending summed score (later parts first
    among equals), each dropped while at least half of it fits in rate x computations."""
    total = [float(score[sub == s].sum()) for s in range(num_subs)]
    size = [int((sub == s).sum()) for s in range(num_subs)]
    budget, used, dropped = rate * score.numel(), 0, set()
    for s in sorted(range(num_subs), key=lambda s: (total[s], -s)):
        if used + size[s] / 2 <= budget + 1e-9:
            dropped.add(s)
            used += size[s]
        else:
            break
    return torch.tensor([int(s) not in dropped for s in sub])


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_whole_subexpert_dropping_drops_the_lowest_summed_sub_experts_whole(rate):
    layer = sparsify(moe_layer(), hidden_batches(4), rate, whole_rows=1024)
    disp, x = layer.dispatcher, hidden_batches(1, tokens=48, seed=5)[0]
    with torch.no_grad():
        routing = layer.router(x)
    assert disp.whole(routing)
    keep = disp.keep(routing)  # [T*k*P]
    score = (routing.weights.unsqueeze(-1) * disp.scale[routing.expert_ids]).flatten()
    sub = (routing.expert_ids.unsqueeze(-1) * 2 + torch.arange(2)).flatten()
    assert torch.equal(keep, greedy_whole_reference(score, sub, E * 2, rate))
    for s in sub.unique():  # a sub-expert is read by all of its choices or by none
        assert keep[sub == s].all() or not keep[sub == s].any()
    per_sub = torch.bincount(sub, minlength=E * 2)
    assert abs((~keep).float().mean() - rate) <= per_sub.max() / 2 / keep.numel()
    k2 = keep.view(-1, 2)
    assert not (k2[:, 1] & ~k2[:, 0]).any()  # kept parts stay a prefix: the minor part drops first


def test_whole_subexpert_dropping_over_interleaved_steps_equals_one_step_at_a_time():
    """steps = S: a [B, S] batch flattened drops what S batches of B tokens (one position each) drop alone."""
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3, whole_rows=64)
    disp, x = layer.dispatcher, hidden_batches(1, tokens=8 * 5, seed=6)[0]  # B = 8 sequences, S = 5 positions
    routing = layer.router(x)
    disp.steps = 5
    together = disp.keep(routing).view(8, 5, K * 2)
    disp.steps = 1
    for s in range(5):
        alone = disp.keep(layer.router(x.view(8, 5, -1)[:, s]))
        assert torch.equal(together[:, s].flatten(), alone)


def test_padding_rows_change_no_whole_subexpert_drop_of_the_real_rows():
    """A CUDA graph pads a batch with copies of token 0 (`valid` 0): the real rows' drops are the unpadded
    batch's, and the padding runs nothing and counts nowhere."""
    layer = sparsify(moe_layer(), hidden_batches(4), 0.25, whole_rows=1024)
    disp, x = layer.dispatcher, hidden_batches(1, tokens=9, seed=7)[0]
    with torch.no_grad():
        want = disp.parts_to_run(layer.router(x))
        padded = torch.cat([x, x[:1].expand(7, -1)])  # 9 real rows in a graph of 16
        disp.valid = torch.tensor([1] * 9 + [0] * 7)
        reset_drop_stats(layer)
        got = disp.fused_parts(layer.router(padded))[1]
        assert torch.equal(got[:9], want) and not got[9:].any()
        assert disp.total == 9 * K * 2 and disp.skipped == int((2 - want).sum())
        disp.valid = None  # without the mask the 7 copies of token 0 pile onto its experts: other drops
        assert not torch.equal(disp.parts_to_run(layer.router(padded))[:9], want)


def test_whole_subexpert_dropping_applies_only_up_to_whole_rows():
    layer = sparsify(moe_layer(), hidden_batches(4), 0.3, whole_rows=16 * K)
    small, large = (layer.router(hidden_batches(1, tokens=t, seed=5)[0]) for t in (16, 17))
    assert layer.dispatcher.whole(small) and not layer.dispatcher.whole(large)
    score = large.weights.unsqueeze(-1) * layer.dispatcher.scale[large.expert_ids]  # per token: a threshold
    keep = layer.dispatcher.keep(large).view(17, K, 2)
    assert score[keep].min() >= score[~keep].max()
    set_drop_rate(layer, 0.3)  # whole_rows back to 0: the per-token rule at every size
    assert not layer.dispatcher.whole(small)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_dropping_matches_a_reference_that_zeroes_the_skipped_parts(layout):
    layer, x = moe_layer(), hidden_batches(1, seed=5)[0]
    sparsify(layer, hidden_batches(4), 0.3)
    layer.dispatcher.layout = layout
    with torch.no_grad():
        got = layer(x)[0]
        routing = layer.router(x)
        keep = layer.dispatcher.keep(routing).view(x.shape[0], K, 2)
        full = layer.experts.full_experts()
        f = full.d_ff // 2
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):  # slow reference: every kept part of every expert, one at a time
            for j in range(K):
                e = int(routing.expert_ids[t, j])
                gate, up = (x[t] @ full.w13[e]).chunk(2)
                for p in range(2):
                    if keep[t, j, p]:
                        act = torch.nn.functional.silu(gate[p * f:(p + 1) * f]) * up[p * f:(p + 1) * f]
                        want[t] += routing.weights[t, j] * (act @ full.w2[e, p * f:(p + 1) * f])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["auto", "padded", "packed"])
def test_zero_drop_dispatches_like_the_plain_layer(layout):
    plain, x = moe_layer(), hidden_batches(1, seed=5)[0]
    layer = sparsify(moe_layer(), hidden_batches(4), 0.0)
    layer.dispatcher.layout = layout
    with torch.no_grad():
        want = plain.dispatcher.dispatch(x, plain.router(x)).wait()
        reset_drop_stats(layer)
        got = layer.dispatcher.dispatch(x, layer.router(x)).wait()
        layer(x)
    assert torch.equal(got.x, want.x) and torch.equal(got.counts, want.counts)  # one segment: all rows, [E]
    assert torch.equal(got.inverse, want.inverse) and got.sent is None
    choices = x.shape[0] * K
    assert drop_stats(layer) == {"drop_rate": 0.0, "skipped": 0, "total": 2 * 2 * choices}  # 2 forwards, P = 2
    counts = layer.dispatcher.last_counts  # still [P, E]: every row ran both parts
    assert counts.shape == (2, E) and counts[0].sum() == 0 and torch.equal(counts[1], want.counts)


@pytest.mark.parametrize("rate", [0.25, 0.4])
def test_packed_rows_past_the_padding_budget_give_the_same_output(rate):
    layer, x = sparsify(moe_layer(), hidden_batches(4), rate), hidden_batches(1, seed=5)[0]
    with torch.no_grad():
        assert layer.dispatcher.dispatch(x, layer.router(x)).wait().x.dim() == 2  # no Triton here: packed
        layer.dispatcher.layout = "padded"  # the GPU's layout, forced
        padded = layer(x)[0]
        assert layer.dispatcher.dispatch(x, layer.router(x)).wait().x.dim() == 3  # [P, T*k, D] segments
        layer.dispatcher.padded_limit_bytes = 0  # every batch is "too big": packed rows, one host sync
        d = layer.dispatcher.dispatch(x, layer.router(x)).wait()
        packed = layer(x)[0]
    assert d.x.dim() == 2 and d.extra["packed"]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_an_empty_batch_gives_an_empty_output(rate):
    layer = sparsify(moe_layer(), hidden_batches(4), rate)
    with torch.no_grad():
        assert layer(torch.zeros(0, hidden_batches(1)[0].shape[1]))[0].shape == (0, hidden_batches(1)[0].shape[1])


def test_a_gradient_through_the_layer_uses_packed_rows():
    layer, x = sparsify(moe_layer(), hidden_batches(4), 0.3), hidden_batches(1, seed=5)[0].requires_grad_()
    assert layer.dispatcher.dispatch(x, layer.router(x)).wait().x.dim() == 2  # padding has no gradient
    with torch.no_grad():
        want = layer(x)[0]
    got = layer(x)[0]
    got.sum().backward()
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_naive_drop_removes_the_lowest_weight_choices():
    layer, x = naive_drop(moe_layer(), hidden_batches(8, tokens=128), 0.25), hidden_batches(1, tokens=128, seed=3)[0]
    assert layer.experts.num_experts == E and layer.dispatcher.parts == 1
    routing = layer.router(x)
    keep = layer.dispatcher.keep(routing).view(-1, K)
    assert routing.weights[keep].min() >= routing.weights[~keep].max()
    assert (~keep).float().mean().item() == pytest.approx(0.25, abs=0.06)


def test_set_drop_rate_recalibrates_nothing_and_zero_is_exact_again():
    layer, x = moe_layer(), hidden_batches(1, seed=5)[0]
    with torch.no_grad():
        want = layer(x)[0]
        sparsify(layer, hidden_batches(4), 0.5)
        assert not torch.allclose(layer(x)[0], want, atol=1e-4)
        set_drop_rate(layer, 0.0)
        torch.testing.assert_close(layer(x)[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda m: sparsify(m, token_batches(1), 1.0), r"drop_rate must be in \[0, 1\)"),
    (lambda m: sparsify(m, token_batches(1), 0.2, parts=5), "parts=5 must be >= 1 and divide"),
    (lambda m: sparsify(sparsify(m, token_batches(1), 0.2), token_batches(1), 0.2), "already sparsified"),
    (lambda m: sparsify(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], 0.2), "no moestack MoE layers"),
    (lambda m: set_drop_rate(m, 0.2), "call sparsify"),
    (lambda m: set_drop_rate(sparsify(m, token_batches(1), 0.2), 0.2, expert_rank=[[0]]), r"lengths \[1\].*\[4, 4\]"),
    (lambda m: set_drop_rate(sparsify(m, token_batches(1), 0.2), 0.2, expert_rank=[[0, 0, 1, 1]] * 3),
     "one row per MoE layer"),
    (lambda m: set_drop_rate(sparsify(m, token_batches(1), 0.2), 0.2, expert_rank=[[0, 0, 1, -1]] * 2),
     r"holds \[-1\]"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model())


@pytest.mark.triton
@pytest.mark.parametrize("T, k, E, P, rate, tied, pad", [
    (64, 8, 64, 2, 0.25, False, 0), (8, 8, 128, 2, 0.25, False, 0), (3, 2, 8, 2, 0.5, False, 0),
    (16, 2, 8, 4, 0.3, False, 0), (128, 8, 128, 2, 0.5, False, 0), (1, 8, 64, 2, 0.25, False, 0),
    (16, 2, 8, 2, 0.3, True, 0), (1, 2, 8, 2, 0.25, True, 0), (5, 2, 6, 2, 0.3, False, 0),
    (7, 3, 5, 3, 0.4, False, 0), (45, 8, 64, 2, 0.35, False, 0), (9, 8, 64, 2, 0.25, False, 7)])
def test_whole_parts_kernel_equals_the_eager_whole_subexpert_drops(triton_device, T, k, E, P, rate, tied, pad):
    """The decode path's one-kernel whole sub-expert drops (rows_triton.whole_parts_run) against the sorts of
    keep_whole_subexperts: the same parts per choice, and the same counts. tied: every part the same scale, so
    an expert's parts tie and the later one must drop first. E * P of 12 and 15: padding sub-experts sort last.
    T 45 at 35%: 2 x rate x computations is a whole number (the budget in integers on both sides). pad: a
    graph's padding tokens (valid 0) after the T real ones, which change nothing and run nothing."""
    import importlib

    rows_triton = importlib.import_module("moestack.moe.rows_triton")
    g = torch.Generator().manual_seed(T * E + k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(triton_device)
    w = torch.rand(T, k, generator=g).softmax(-1).to(triton_device)
    scale = torch.rand(E, P, generator=g).sort(dim=1, descending=True).values.to(triton_device)
    if tied:
        scale = torch.ones_like(scale)
    score = (w.unsqueeze(-1) * scale[ids]).flatten()
    sub = (ids.unsqueeze(-1) * P + torch.arange(P, device=triton_device)).flatten()
    keep = keep_whole_subexperts(score, sub, torch.zeros_like(sub), E * P, 1, rate).view(T * k, P)
    want = keep.long().cumprod(dim=1).sum(dim=1)
    assert torch.equal(want, keep.long().sum(dim=1))  # the kept parts are a prefix
    stats = torch.zeros(2, dtype=torch.int64, device=triton_device)
    valid = None
    if pad:  # padding tokens: copies of token 0
        ids, w = torch.cat([ids, ids[:1].expand(pad, -1)]), torch.cat([w, w[:1].expand(pad, -1)])
        valid = torch.tensor([1] * T + [0] * pad, device=triton_device)
    got = rows_triton.whole_parts_run(w, ids, scale, quantized_rate(rate), RATE_BITS, stats, valid).flatten()
    assert torch.equal(got[T * k:].cpu(), torch.zeros(pad * k, dtype=torch.int32))
    got = got[:T * k]
    assert torch.equal(got.long().cpu(), want.cpu())
    assert stats.tolist() == [T * k * P, int(want.sum())]
    assert int(want.sum()) < T * k * P or T * k * P * rate < 1  # something dropped


def grouped_layer(d_ff: int, dtype: torch.dtype, device: str = "cuda", tokens: int = 512):
    """A grouped_mm MoE layer (hidden 64) on `device` and five batches of `tokens` tokens for it."""
    from moestack.moe.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, E, K, d_ff, aux_loss_coef=0.0, z_loss_coef=0.0, impl="grouped_mm")
    layer = layer.to(device, dtype).eval()
    return layer, [torch.randn(tokens, 64, device=device, dtype=dtype) for _ in range(5)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_grouped_mm_path_on_gpu():
    layer, batches = grouped_layer(128, torch.bfloat16)
    with torch.no_grad():
        want = layer(batches[0])[0]
        sparsify(layer, batches[1:], 0.0)
        assert layer.experts.impl == "grouped_mm" and layer.experts.parts == 2
        torch.testing.assert_close(layer(batches[0])[0].float(), want.float(), atol=2e-2, rtol=2e-2)
        set_drop_rate(layer, 0.25)
        reset_drop_stats(layer)
        layer(batches[0])
    assert drop_stats(layer)["drop_rate"] == pytest.approx(0.25, abs=0.06)


@pytest.mark.triton
@pytest.mark.parametrize("policy", ["uniform", "load_aware", "whole"])
@pytest.mark.parametrize("parts", [2, 3])
def test_triton_segment_kernels_match_the_eager_path(parts, policy, monkeypatch, triton_device):
    import moestack.inference.dropping as dropping

    layer, batches = grouped_layer(192, torch.float32, triton_device, 512 if triton_device == "cuda" else 96)
    x = batches[0]
    with torch.no_grad():
        sparsify(layer, batches[1:], 0.3, parts=parts)
        set_drop_rate(layer, 0.3, load_aware=policy == "load_aware", expert_rank=[[e // 2 for e in range(E)]],
                      whole_rows=(1 << 20) if policy == "whole" else 0)
        assert dropping.fused_inference(x)
        assert layer.dispatcher.dispatch(x, layer.router(x)).wait().order is None  # planned, not sorted
        reset_drop_stats(layer)
        fused, fused_stats = layer(x)[0], drop_stats(layer)
        fused_counts = layer.dispatcher.last_counts
        monkeypatch.setattr(dropping, "fused_inference", lambda *tensors: False)
        reset_drop_stats(layer)
        eager = layer(x)[0]
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    assert fused.abs().sum() > 0 and fused_stats == drop_stats(layer) and fused_stats["skipped"] > 0
    assert torch.equal(fused_counts.long(), layer.dispatcher.last_counts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("whole_rows", [0, 1 << 20])
def test_a_cuda_graph_of_the_sparse_layer_replays_its_output_and_its_drop_counts(whole_rows):
    """Per token and dropping whole sub-experts (sorts and scatters on the device): no host sync, so a graph
    captures the layer, and its replays give the eager output and drop counts."""
    # bf16: torch._grouped_mm's fp32 path on CUDA is a fallback that copies the offsets to the host
    layer, batches = grouped_layer(192, torch.bfloat16)
    x = batches[0]
    with torch.no_grad():
        sparsify(layer, batches[1:], 0.3, whole_rows=whole_rows)
        assert layer.dispatcher.whole(layer.router(x)) == bool(whole_rows)
        reset_drop_stats(layer)
        want = layer(x)[0].clone()
        once = drop_stats(layer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # no host sync in the layer, or capture would fail
            out = layer(x)[0]
        reset_drop_stats(layer)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
    st = drop_stats(layer)
    assert st["skipped"] == 3 * once["skipped"] > 0 and st["drop_rate"] == pytest.approx(once["drop_rate"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_whole_parts_kernel_in_a_cuda_graph_follows_its_inputs():
    """Captured once, replayed on new routings and padding masks written into its inputs: each replay gives
    what the eager sorts give for that batch's real rows."""
    from moestack.moe.rows_triton import whole_parts_run

    T, k, E, P, rate = 64, 8, 64, 2, 0.25
    g = torch.Generator().manual_seed(3)

    def batch():
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
        return ids, torch.rand(T, k, generator=g).softmax(-1).cuda()

    scale = torch.rand(E, P, generator=g).sort(dim=1, descending=True).values.cuda()
    ids, w = batch()
    valid = torch.ones(T, dtype=torch.long, device="cuda")
    stats = torch.zeros(2, dtype=torch.int64, device="cuda")
    whole_parts_run(w, ids, scale, quantized_rate(rate), RATE_BITS, stats, valid)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        j = whole_parts_run(w, ids, scale, quantized_rate(rate), RATE_BITS, stats, valid)
    for n in (64, 37, 8):
        new_ids, new_w = batch()
        ids.copy_(new_ids)
        w.copy_(new_w)
        valid.copy_((torch.arange(T, device="cuda") < n).long())
        graph.replay()
        score = (w[:n].unsqueeze(-1) * scale[ids[:n]]).flatten()
        sub = (ids[:n].unsqueeze(-1) * P + torch.arange(P, device="cuda")).flatten()
        keep = keep_whole_subexperts(score, sub, torch.zeros_like(sub), E * P, 1, rate).view(n * k, P)
        assert torch.equal(j[:n].flatten().long(), keep.long().cumprod(dim=1).sum(dim=1))
        assert not j[n:].any()
