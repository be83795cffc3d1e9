"""Pipelined decoding (the next decode step queued before this step's tokens are read back) gives the
outputs of the plain loop: greedy and seeded sampling, eos, stop strings, different lengths, aborts."""

import torch

from moestack.serve import LLM, SamplingParams, loader
from moestack.serve import runner as runner_mod
from tests.inference.hf_tiny import tiny_model

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], list(range(10, 30)), [40] * 5, [3, 3, 3]]
PARAMS = [SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=ie)
          for m, t, s, ie in [(10, 0, None, True), (25, 1.0, 5, False), (7, 0.8, 3, True), (30, 0, None, False),
                              (18, 1.2, 11, True)]]


def engine(pipeline: bool, **kw) -> LLM:
    hf = tiny_model("qwen3_moe")
    served = loader.Served(loader.build_hf(hf.config, hf.state_dict()), loader.Tokenizer(), "q", "qwen3_moe", None)
    llm = LLM(served, device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=16, pipeline=pipeline, **kw)
    llm.eos = {17}  # a token the random model does produce: sequences end at different steps
    return llm


def test_pipelined_outputs_equal_the_plain_loop(monkeypatch):
    ahead = []
    launch = runner_mod.ModelRunner.launch

    def counting(self, *args, **kw):
        ahead.append(kw.get("ahead") is not None)
        return launch(self, *args, **kw)

    plain = engine(False)
    ref = plain.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.setattr(runner_mod.ModelRunner, "launch", counting)
    piped = engine(True)
    got = piped.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert sum(ahead) > 10  # most decode steps were queued ahead
    assert "stop" in {o.finish_reason for o in ref}
    assert [(o.token_ids, o.finish_reason, o.text) for o in got] == [(o.token_ids, o.finish_reason, o.text) for o in ref]
    piped.check_blocks()
    assert piped.blocks.num_free == piped.blocks.num_blocks and not piped.has_unfinished()


def test_abort_while_a_step_is_queued_ahead():
    llm = engine(True)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    rids = [llm.add_request(p, params) for p in PROMPTS[:3]]
    for _ in range(6):
        llm.step()
    assert llm._pending is not None  # a decode step is in flight
    assert llm.abort(rids[1])
    texts = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id != rids[1]
            if out.finished:
                texts[out.request_id] = out.completion.token_ids
    ref = engine(False).generate([PROMPTS[0], PROMPTS[2]], params, use_tqdm=False)
    assert [texts[rids[0]], texts[rids[2]]] == [o.token_ids for o in ref]
    llm.check_blocks()
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_decode_graph_inputs_and_sampled_rows():
    """What a decode-graph replay sends (CUDA only, so built and checked here on the host): per row its token,
    position, cache slot and valid flag, its context length, its block table up to the columns in use; rows
    past the batch on the scratch block with length 1; and which rows a step samples."""
    from moestack.serve.sequence import Sequence

    llm = engine(False)
    r = llm.runner
    a, b = Sequence("a", [5, 6, 7, 8, 9], SamplingParams()), Sequence("b", [1, 2], SamplingParams())
    a.block_table, a.num_computed = [3, 7], 4  # 5 tokens, 4 computed: position 4 (block 7, offset 0)
    b.block_table, b.num_computed = [2], 1
    longs, lens, tables = r.decode_inputs([(a, 1), (b, 1)], size=4, rows=6)
    bs, scratch = r.block_size, r.scratch
    assert longs.tolist() == [[9, 2, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0], [7 * bs, 2 * bs + 1] + [scratch * bs] * 4,
                              [1, 1, 0, 0, 0, 0]]
    assert lens.tolist() == [5, 2, 1, 1, 1, 1]
    assert tables.tolist() == [[3, 7], [2, scratch], [scratch] * 2, [scratch] * 2]
    ahead_longs, ahead_lens, _ = r.decode_inputs([(a, 1)], size=1, rows=2, ahead=True)  # one position further
    assert ahead_longs[:2].tolist() == [[0, 0], [5, 0]] and ahead_lens.tolist() == [6, 1]
    assert runner_mod.sampled_rows([(a, 1), (b, 1)], [a, b]) is None
    assert runner_mod.sampled_rows([(a, 1), (b, 1)], [b]) == [1]
