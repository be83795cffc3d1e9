"""The engine's GPU fast paths against the references, on the GPU: CUDA-graph decode and prefill steps with the
Triton paged attention kernels and the fused MoE kernels give Hugging Face `generate`'s greedy tokens (fp32),
also with chunked prefill, prefix-cache hits and preemption, and bf16 steps through graphs pick the dense
forward's greedy tokens."""

import contextlib

import pytest
import torch

from moestack.serve import LLM, SamplingParams, loader
from tests.inference.hf_tiny import tiny_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], list(range(10, 40)), [5] * 20]


def served(family: str, dtype=torch.float32) -> loader.Served:
    hf = tiny_model(family)
    model = loader.build_hf(hf.config, hf.state_dict(), "cuda", dtype)
    return loader.Served(model, loader.Tokenizer(), family, family, None), hf


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_graph_decode_matches_hf_generate(family):
    s, hf = served(family)
    hf = hf.cuda()
    llm = LLM(s, device="cuda", num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    assert llm.runner.graphs and llm.runner.triton_decode
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref, (family, p)
    # fp32: decodes replay graphs; prompts run eagerly (engine.py: fp32 grouped_mm reads its offsets on the host)
    assert not llm.runner.prefill_graphs and 0 < llm.stats.graph_steps < llm.stats.steps
    llm.check_blocks()


def test_graph_prefill_chunks_prefix_hits_and_preemption_match_hf_generate():
    """Chunked prompts (max_num_batched_tokens 12), shared prefixes and a KV cache too small for all of them:
    in fp32 the tokens are HF greedy's (decodes through graphs, prompts eagerly); in bf16 every step replays a
    graph (steps of up to 12 tokens) and picks the dense forward's greedy tokens."""
    shared = list(range(3, 19))
    prompts = [shared + [20, 21], [9, 8, 7, 6, 5, 4, 3], shared + [30], [11] * 25, list(range(30, 60))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    kw = dict(device="cuda", num_blocks=14, block_size=4, max_num_seqs=4, max_num_batched_tokens=12)
    s, hf = served("mixtral")
    hf = hf.cuda()
    llm = LLM(s, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref, p
    assert llm.stats.cached_tokens > 0 and llm.scheduler.num_preemptions > 0
    llm.check_blocks()
    s16, _ = served("mixtral", torch.bfloat16)
    llm = LLM(s16, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sorted(llm.runner.prefill_graphs) == [12] and llm.stats.graph_steps == llm.stats.steps
    assert llm.stats.cached_tokens > 0 and llm.scheduler.num_preemptions > 0
    assert_greedy_under_dense(s16.model, prompts, outs)
    llm.check_blocks()


def test_fused_experts_match_grouped_path_bf16():
    """One decode-sized batch through the fused kernels and through dispatch + grouped experts."""
    from moestack.moe.fused import fused_experts

    torch.manual_seed(0)
    T, D, F, E, k = 24, 256, 512, 16, 4
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, D, 2 * F, device="cuda", dtype=torch.bfloat16) / D ** 0.5
    w2 = torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) / F ** 0.5
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
    w = torch.rand(T, k, device="cuda").softmax(-1)
    y = fused_experts(x, ids, w, w13, w2).float()
    ref = torch.zeros(T, D, device="cuda")
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            g, u = (x[t].float() @ w13[e].float()).chunk(2)
            ref[t] += w[t, j] * ((torch.nn.functional.silu(g) * u) @ w2[e].float())
    assert (y - ref).abs().max() < 3e-2 * ref.abs().max()


def test_graph_decode_bf16_is_greedy_under_the_dense_forward():
    """bf16 rounding differs between paths, so check each token the graphs chose is the argmax of the dense
    (no cache, no graph) forward over the same sequence, up to bf16 noise."""
    s, _ = served("qwen3_moe", torch.bfloat16)
    llm = LLM(s, device="cuda", num_blocks=64, block_size=4, max_num_seqs=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert llm.runner.prefill_graphs and llm.stats.graph_steps == llm.stats.steps
    assert_greedy_under_dense(s.model, PROMPTS, outs)


def test_graph_decode_bf16_with_split_out_projections_is_greedy_under_the_dense_forward(monkeypatch):
    """The tiny model's out projections split too (the real shapes do: `fused.few_rows_splits`), so the decode
    graphs run split-K partials summed by the add + norm, the MoE's unsummed choice rows and the few-rows head."""
    from moestack.serve import model as serve_model

    monkeypatch.setattr(serve_model, "few_rows_splits", lambda n, k, sms: 2)
    splits = []
    real = serve_model.few_rows_linear
    monkeypatch.setattr(serve_model, "few_rows_linear", lambda x, w, s=1: splits.append(s) or real(x, w, s))
    s, _ = served("qwen3_moe", torch.bfloat16)
    llm = LLM(s, device="cuda", num_blocks=64, block_size=4, max_num_seqs=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert 2 in splits and 1 in splits and llm.stats.graph_steps == llm.stats.steps
    assert_greedy_under_dense(s.model, PROMPTS, outs)


def test_few_rows_gemms_and_stacked_adds_at_real_shapes_bf16():
    """At Qwen3-30B-A3B's shapes, batch 8: the LM head through `few_rows_linear` against cuBLAS, the split-K out
    projection summed by the add + norm against cuBLAS + add, the MoE's choice rows summed by it against torch."""
    import torch.nn.functional as F

    from moestack.moe.experts import sm_count
    from moestack.moe.fused import few_rows_linear, few_rows_splits
    from moestack.serve.norm_triton import add_rms_norm

    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, head = torch.randn(8, 2048, **bf), torch.randn(151936, 2048, **bf) / 45
    got, ref = few_rows_linear(x, head).float(), F.linear(x, head).float()
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
    o, w = torch.randn(8, 4096, **bf), torch.randn(2048, 4096, **bf) / 64
    h, nw = torch.randn(8, 2048, **bf), torch.rand(2048, **bf)
    n = few_rows_splits(2048, 4096, sm_count(o))
    assert n > 1
    total, normed = add_rms_norm(h, few_rows_linear(o, w, n).transpose(0, 1), nw, 1e-6)
    want = h + F.linear(o, w)
    assert (total.float() - want.float()).abs().max() < 2e-2 * want.float().abs().max()
    assert (normed.float() - F.rms_norm(want, (2048,), nw, 1e-6).float()).abs().max() < 5e-2
    rows = torch.randn(8, 8, 2048, **bf)
    total, _ = add_rms_norm(h, rows, nw, 1e-6)
    torch.testing.assert_close(total, (h.float() + rows.float().sum(1).to(torch.bfloat16).float()).to(torch.bfloat16),
                               atol=2e-2, rtol=1e-2)


@contextlib.contextmanager
def eager(model):
    """The model's eager paths (no fused MoE, router or add + norm kernels) while inside."""
    layers = model.moe_layers()
    saved = model.fused_norms, [(m.fused_rows, m.router.fused_topk) for m in layers]
    model.fused_norms = False
    for m in layers:
        m.fused_rows, m.router.fused_topk = 0, False
    try:
        yield model
    finally:
        model.fused_norms = saved[0]
        for m, (rows, topk) in zip(layers, saved[1]):
            m.fused_rows, m.router.fused_topk = rows, topk


def assert_greedy_under_dense(model, prompts, outs):
    """Each generated token is the argmax of the dense (no cache, no graph, eager paths) forward over the same
    sequence, up to bf16 noise."""
    with torch.inference_mode(), eager(model):
        for p, o in zip(prompts, outs):
            seq = torch.tensor([p + o.token_ids], device="cuda")
            logits = model(seq)[0, len(p) - 1:-1].float()  # the logits each generated token was chosen from
            chosen = logits.gather(1, torch.tensor(o.token_ids, device="cuda")[:, None])[:, 0]
            gap = logits.max(1).values - chosen
            assert gap.max() < 0.05 * logits.abs().max(), (p, gap)
