"""Requests: validation (one clear ValueError, nothing queued), sampling, stop conditions, streaming deltas."""

import pytest

from moestack.serve import LLM, SamplingParams
from tests.serve.helpers import hf_folder

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe")
    hf_folder(path, "olmoe")
    return LLM(str(path), device="cpu", block_size=4, num_blocks=64, max_model_len=48)


@pytest.mark.parametrize("fields, match", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(stop=[""]), "stop"), (dict(stop=[3]), "stop"), (dict(seed="x"), "seed"),
    (dict(ignore_eos="yes"), "ignore_eos")])
def test_sampling_params_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**fields)


def test_unknown_sampling_field_names_it():
    with pytest.raises(ValueError, match="unknown sampling field.*beam_width.*max_tokens"):
        SamplingParams.from_dict({"max_tokens": 4, "beam_width": 2})


@pytest.mark.parametrize("prompt, match", [("", "empty"), ([], "empty"), ("x" * 60, "context"),
                                           ([1, 2, 99], "outside the vocabulary"), ([1.5], "token ids"),
                                           (None, "string or a list")])
def test_bad_prompt_is_a_value_error_and_nothing_runs(llm, prompt, match):
    with pytest.raises(ValueError, match=match) as err:
        llm.generate(["ok", prompt], GREEDY, use_tqdm=False)
    assert "prompt 1" in str(err.value)
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks


def test_a_bad_request_mid_run_leaves_the_others_alone(llm):
    prompts = ["def f(x):", "class a:", "import os"]
    ref = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    rids = [llm.add_request(p, GREEDY) for p in prompts[:2]]
    llm.step()
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("", GREEDY)
    with pytest.raises(ValueError, match="unknown sampling field"):
        llm.add_request("x", {"max_tokens": 2, "n": 3})
    rids.append(llm.add_request(prompts[2], GREEDY))
    done = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.completion.token_ids
    assert [done[r] for r in rids] == ref
    llm.check_blocks()


def test_abort_frees_blocks(llm):
    rid = llm.add_request("def f(x):", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    llm.step()
    llm.step()
    assert llm.blocks.num_free < llm.blocks.num_blocks
    assert llm.abort(rid) and not llm.abort(rid)
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    alone = llm.generate(["abc"], p, use_tqdm=False)[0].token_ids
    crowd = llm.generate(["xyz", "abc", "hello"], [SamplingParams(max_tokens=12, temperature=0.9, seed=1), p,
                                                   GREEDY], use_tqdm=False)
    assert crowd[1].token_ids == alone
    other = llm.generate(["abc"], SamplingParams(max_tokens=12, temperature=1.0, seed=8), use_tqdm=False)[0]
    assert other.token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate(["def f"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    k1 = llm.generate(["def f"], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=0, ignore_eos=True),
                      use_tqdm=False)
    p0 = llm.generate(["def f"], SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=0, ignore_eos=True),
                      use_tqdm=False)
    assert k1[0].token_ids == greedy[0].token_ids == p0[0].token_ids


def test_stop_string_eos_and_length(llm):
    free = llm.generate(["def f"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.text[3:5]
    cut = llm.generate(["def f"], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    eos_id = free.token_ids[4]
    saved = llm.eos
    llm.eos = {eos_id}
    try:
        ended = llm.generate(["def f"], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
        ignored = llm.generate(["def f"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0]
    finally:
        llm.eos = saved
    first = free.token_ids.index(eos_id)
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:first + 1]
    assert ignored.token_ids == free.token_ids


def test_streaming_deltas_add_up_to_the_text(llm):
    stop = SamplingParams(max_tokens=20, temperature=0, stop=["zz", "q;"], ignore_eos=True)
    rids = [llm.add_request(p, stop) for p in ["def f", "for i in"]]
    pieces, tokens, final = {r: "" for r in rids}, {r: [] for r in rids}, {}
    while llm.has_unfinished():
        for out in llm.step():
            pieces[out.request_id] += out.new_text
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = out.completion
    for r in rids:
        assert pieces[r] == final[r].text and tokens[r] == final[r].token_ids


def test_context_limit_finishes_with_length(llm):
    out = llm.generate([list(range(2, 42))], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 48


def _dense_logits(llm, prompt: list[int], out: list[int]):
    import torch

    with torch.inference_mode():
        seq = torch.tensor([prompt + out])
        return llm.model(seq)[0, len(prompt) - 1:-1].float()  # the logits each generated token came from


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.0, 0.0), (-0.5, 0.8)])
def test_penalties_follow_the_openai_rule(llm, presence, frequency):
    """Each greedy token is the argmax of logit - frequency x count - presence x [count > 0] over the tokens
    generated before it (checked against the dense forward of the whole sequence), and penalties change
    the output of a prompt that repeats itself without them."""
    import torch

    prompt = llm.encode_prompt("abcabcabc")[0]
    plain = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency)
    got = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    logits = _dense_logits(llm, prompt, got)
    for t, tok in enumerate(got):
        counts = torch.bincount(torch.tensor(got[:t], dtype=torch.long), minlength=logits.shape[1]).float()
        adjusted = logits[t] - frequency * counts - presence * (counts > 0).float()
        assert adjusted[tok] >= adjusted.max() - 1e-4, t
    assert got != plain.token_ids
    llm.check_blocks()


def test_logprobs_are_the_models_log_softmax(llm):
    import torch

    prompts = [llm.encode_prompt(p)[0] for p in ("def f(x):", "x = 1")]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=0)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0].logprobs is None
    for p, o, sp in zip(prompts, outs, params):
        assert [lp.token_id for lp in o.logprobs] == o.token_ids
        ref = _dense_logits(llm, p, o.token_ids).log_softmax(-1)
        for t, lp in enumerate(o.logprobs):
            assert abs(lp.logprob - ref[t, lp.token_id].item()) < 1e-4
            assert len(lp.top) == sp.logprobs
            top = ref[t].topk(sp.logprobs)
            assert [i for i, _ in lp.top] == top.indices.tolist()
            assert all(abs(v - w) < 1e-4 for (_, v), w in zip(lp.top, top.values.tolist()))
        if sp.greedy:
            assert all(lp.top[0][0] == lp.token_id for lp in o.logprobs)


@pytest.mark.parametrize("fields, match", [(dict(presence_penalty=2.5), "presence_penalty"),
                                           (dict(frequency_penalty="x"), "frequency_penalty"),
                                           (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs")])
def test_penalty_and_logprob_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**fields)


def test_sample_takes_the_steps_argmax_only_for_plain_greedy_batches():
    """The decode graphs hand `sample` their argmax and bf16 logits: a batch of plain greedy rows gets that
    argmax as it is; penalties, logprobs or a sampled row send it through the fp32 logits."""
    import torch

    from moestack.serve.sampling import sample

    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], dtype=torch.bfloat16)
    marker = torch.tensor([7, 9])  # not the argmax: shows which path ran
    greedy = SamplingParams(max_tokens=1, temperature=0)
    tokens, lp = sample(logits, [greedy, greedy], [None, None], None, marker)
    assert tokens is marker and lp is None
    tokens, lp = sample(logits, [greedy, SamplingParams(max_tokens=1, temperature=0, logprobs=1)], [None, None],
                        None, marker)
    assert tokens.tolist() == [1, 0] and lp.chosen.dtype == torch.float32
    tokens, _ = sample(logits, [greedy, greedy], [None, None], [[1], [0]], marker)  # penalties asked for
    assert tokens.tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    tokens, _ = sample(logits, [greedy, SamplingParams(max_tokens=1, temperature=1.0, top_k=1)], [None, gen], None,
                       marker)
    assert tokens.tolist() == [1, 0]
