"""The engine against Hugging Face `generate` (fp32, CPU) for every supported family loaded from a
`save_pretrained` folder, with chunked prefill, forced preemption and prefix caching; and a moestack run."""

import pytest
import torch

from moestack.inference.dropping import DualSparseDispatcher
from moestack.serve import LLM, SamplingParams
from moestack.serve.engine import WHOLE_ROWS
from tests.serve.helpers import hf_folder, hf_greedy

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# different lengths, two sharing a 16-token prefix (prefix caching), one longer than the step budget
PROMPTS = [[2, 3, 4, 5, 6, 7, 8], [9, 8, 7], list(range(10, 30)), list(range(10, 26)) + [5, 5],
           list(range(10, 26)) + [6], list(range(30, 60))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_folder(path, request.param)
    refs = [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    return request.param, path, refs


@pytest.mark.parametrize("case", ["plain", "preempt", "prefix"])
def test_greedy_equals_hf_generate(family_folder, case):
    family, path, refs = family_folder
    kw = dict(num_blocks=9, prefix_caching=False) if case == "preempt" else dict(num_blocks=64)
    if case == "plain":
        kw["prefix_caching"] = False
    llm = LLM(str(path), device="cpu", block_size=4, max_num_batched_tokens=16, **kw)
    assert llm.served.kind == family
    n = 5 if case == "preempt" else len(PROMPTS)  # 9 blocks of 4 tokens hold the longest of these alone
    outs = llm.generate(PROMPTS[:n], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs[:n]
    if case == "preempt":
        assert llm.scheduler.num_preemptions > 0
    if case == "prefix":
        assert sum(o.num_cached_tokens for o in outs) > 0
    llm.check_blocks()
    assert llm.blocks.num_free == llm.blocks.num_blocks and not llm.has_unfinished()


def test_string_prompts_and_text(family_folder):
    _, path, _ = family_folder
    llm = LLM(str(path), device="cpu", block_size=4)
    prompt = "def add(a, b):"
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    ids = llm.tokenizer.encode(prompt)
    assert out.prompt_token_ids == ids and len(out.token_ids) == 10
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert llm.generate([ids], GREEDY, use_tqdm=False)[0].token_ids == out.token_ids


def test_expert_loads_count_every_choice(family_folder):
    _, path, _ = family_folder
    llm = LLM(str(path), device="cpu", block_size=4)
    llm.add_request(PROMPTS[2], GREEDY)
    llm.add_request(PROMPTS[0], GREEDY)
    llm.step()  # prefill of both: 27 tokens
    loads = llm.expert_loads()
    top_k = llm.model.moe_layers()[0].router.top_k
    assert loads.shape == (len(llm.model.moe_layers()), llm.model.moe_layers()[0].num_experts)
    assert (loads.sum(1) == 27 * top_k).all()
    llm.step()  # two decodes
    assert (llm.expert_loads().sum(1) == 2 * top_k).all()


def test_normed_hidden_states_are_the_final_norm_of_the_hidden_states(family_folder):
    """What the decode graphs feed the LM head (`hidden(normed=True)`, the last residual add fused with the final
    norm) equals the final norm of the plain hidden states, and its argmax the logits' argmax."""
    _, path, _ = family_folder
    llm = LLM(str(path), device="cpu", block_size=4)
    model = llm.model
    tokens = torch.tensor(PROMPTS[0])
    positions = torch.arange(len(PROMPTS[0]))
    with torch.inference_mode():
        h = model.hidden(tokens, positions, None, 1)
        x = model.hidden(tokens, positions, None, 1, normed=True)
        torch.testing.assert_close(x, model.norm(h))
        assert torch.equal(model.lm_head(x).argmax(-1), model.logits(h).argmax(-1))


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    import transformers

    transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mixtral") as err:
        LLM(str(tmp_path), device="cpu")
    assert "llama" in str(err.value)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    hf_folder(tmp_path, "olmoe")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(str(tmp_path), device="cpu")


def test_dualsparse_in_the_engine(tmp_path):
    model = hf_folder(tmp_path, "qwen3_moe")
    refs = [hf_greedy(model, p, 10) for p in PROMPTS[:3]]
    exact = LLM(str(tmp_path), device="cpu", block_size=4, drop_rate=0.0, calib_batches=2)
    assert [o.token_ids for o in exact.generate(PROMPTS[:3], GREEDY, use_tqdm=False)] == refs
    dropping = LLM(str(tmp_path), device="cpu", block_size=4, drop_rate=0.5, calib_batches=2)
    outs = dropping.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert all(len(o.token_ids) == 10 and all(0 <= t < 64 for t in o.token_ids) for o in outs)
    dropping.check_blocks()
    # auto is the default: decode-sized steps drop whole sub-experts; token keeps the per-token rule
    token = LLM(str(tmp_path), device="cpu", block_size=4, drop_rate=0.5, calib_batches=2, drop_policy="token")
    for llm, rows in ((dropping, WHOLE_ROWS), (token, 0)):
        disps = [m for m in llm.model.modules() if isinstance(m, DualSparseDispatcher)]
        assert disps and all(d.whole_rows == rows for d in disps)
    with pytest.raises(ValueError, match="drop_policy 'whole'.*auto, token"):
        LLM(str(tmp_path), device="cpu", drop_rate=0.25, drop_policy="whole")
    for policy in ("auto", "token"):
        with pytest.raises(ValueError, match=f"drop_policy='{policy}' applies to DualSparse dropping: give drop_rate"):
            LLM(str(tmp_path), device="cpu", drop_policy=policy)


def test_realb_in_the_engine(tmp_path):
    """--realb: with the default thresholds text prompts stay BF16 (the greedy output is HF's); with the
    thresholds down, simulated ranks run FP8 and the engine counts the layer forwards it lowered."""
    from moestack.inference.realb import RealbConfig

    model = hf_folder(tmp_path, "qwen3_moe")
    refs = [hf_greedy(model, p, 10) for p in PROMPTS[:3]]
    off = LLM(str(tmp_path), device="cpu", block_size=4, realb=RealbConfig(ranks=2, min_tokens=1))
    assert [o.token_ids for o in off.generate(PROMPTS[:3], GREEDY, use_tqdm=False)] == refs
    assert off.stats.realb_layers > 0 and off.stats.realb_low_layers == 0  # decided, and text stays BF16
    low = LLM(str(tmp_path), device="cpu", block_size=4,
              realb=RealbConfig(ranks=2, modality=0.0, load_ratio=1.0, min_tokens=1, min_expert_rows=0))
    outs = low.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert all(len(o.token_ids) == 10 for o in outs)
    assert 0 < low.stats.realb_low_layers <= low.stats.realb_layers
    with pytest.raises(ValueError, match="do not combine"):
        LLM(str(tmp_path), device="cpu", drop_rate=0.25, realb=RealbConfig())
