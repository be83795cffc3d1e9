"""The engine serves moestack runs (top2, shared_top1, scmoe): greedy tokens equal the training model's own
full-recompute generate; `moestack generate` goes through the engine for runs and Hugging Face folders."""

import pytest
import torch

from moestack.cli import main
from moestack.config import load_config
from moestack.runs import load_model
from moestack.serve import LLM, SamplingParams
from tests.inference.test_cli import TINY
from tests.serve.helpers import hf_folder

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["def f(x):", "import", "class Foo(object):\n    "]


@pytest.fixture(scope="module", params=["top2", "shared_top1", "scmoe"])
def run(request, tmp_path_factory):
    from moestack.train import train

    base = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESTACK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(load_config(overrides={**TINY, "model.arch": request.param, "train.run_dir": str(base / "run")}))
        yield base / "run"


def test_run_greedy_equals_the_training_model(run):
    model, cfg, _ = load_model(run, device="cpu")
    llm = LLM(str(run), device="cpu", block_size=4, max_num_batched_tokens=8)
    assert llm.served.kind == "moestack"
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = list(prompt.encode())
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), 8, temperature=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
        full = llm.tokenizer.decode(ref)  # the text, less a trailing partial UTF-8 character held back
        assert full.startswith(out.text) and len(full) - len(out.text) <= 1
    llm.check_blocks()


def test_generate_command_on_a_run_and_a_hf_folder(run, tmp_path, capsys):
    assert main(["generate", "--model", str(run), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    hf_folder(tmp_path, "qwen3_moe")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("abc")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "", "--device", "cpu"]) == 2
    assert "empty" in capsys.readouterr().err
    # DualSparse in the engine, whole sub-experts in the decode steps (the engine logs its set-up to stderr)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "4", "--device", "cpu",
                 "--drop-rate", "0.25", "--drop-policy", "auto"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("abc") and "drop rate 0.25, whole sub-experts in steps of <= 1024 choices" in err


def _ep_run(rank, world, path, refs, arch):
    from moestack.config import ParallelConfig
    from moestack.parallel.mesh import init_parallel, shutdown

    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    for flow in ("home", "follow"):
        if arch == "scmoe" and flow == "follow":
            with pytest.raises(ValueError, match="ScMoE models serve with ep_flow='home'"):
                LLM(path, device="cpu", block_size=4, parallel=ctx, ep_flow=flow)
            continue
        llm = LLM(path, device="cpu", block_size=4, max_num_batched_tokens=8, parallel=ctx, ep_flow=flow)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == refs, flow
    shutdown(ctx)


def test_a_run_serves_expert_parallel_on_2_ranks_with_both_flows(run):
    """A run folder under EP serving (2 gloo ranks): the same greedy tokens as one process, home and follow."""
    from tests.dist import run_ranks

    one = LLM(str(run), device="cpu", block_size=4, max_num_batched_tokens=8)
    refs = [o.token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
    run_ranks(_ep_run, 2, str(run), refs, one.model.spec.scmoe and "scmoe" or "moe")
