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
