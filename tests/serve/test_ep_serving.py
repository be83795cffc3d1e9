"""Expert-parallel serving on 2 and 4 gloo ranks: greedy outputs equal the single-process engine's (and so
HF's), under any placement, with requests of different lengths finishing and arriving at different steps;
the engine counts the bytes each rank sends to each rank."""

import pytest
import torch

from moestack.config import ParallelConfig
from moestack.parallel.mesh import init_parallel, shutdown
from moestack.placement.placement import Placement
from moestack.serve import LLM, SamplingParams
from tests.dist import run_ranks
from tests.serve.helpers import hf_folder, hf_greedy

PROMPTS = [[2, 3, 4, 5, 6, 7, 8], [9, 8, 7], list(range(10, 30)), list(range(10, 26)) + [5, 5], [40, 41]]
LENGTHS = [10, 4, 7, 1, 12]  # requests finish at different steps; with 2 ranks one runs idle steps
E, LAYERS = 8, 2


def _params(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _check(rank, world, path, refs, placement_rows):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    placement = Placement(world, placement_rows) if placement_rows else None
    llm = LLM(path, device="cpu", block_size=4, parallel=ctx, placement=placement)
    assert llm.model.moe_layers()[0].experts.w13.shape[0] == E // world  # this rank keeps its experts only
    forwarded = []  # tokens of every forward on this rank, idle ones included
    hidden = llm.model.hidden
    llm.model.hidden = lambda tokens, *a, **kw: (forwarded.append(tokens.numel()), hidden(tokens, *a, **kw))[1]
    outs = llm.generate(PROMPTS, [_params(n) for n in LENGTHS], use_tqdm=False)
    assert [o.token_ids for o in outs] == refs  # every rank returns the whole list, in order
    bytes_ = llm.traffic()
    assert bytes_.shape == (LAYERS, world, world)
    assert torch.equal(bytes_, bytes_.transpose(1, 2))  # a -> b dispatch rows come back b -> a in the combine
    assert (bytes_.sum(0) > 0).all()
    per_layer = bytes_.sum((1, 2))
    tokens = torch.tensor([sum(forwarded)])
    torch.distributed.all_reduce(tokens, group=ctx.ep_group)
    top_k, d_model, fp32 = 2, 32, 4
    # every token-choice of every forward travels out (dispatch) and back (combine), to itself included
    assert (per_layer == 2 * top_k * d_model * fp32 * tokens.item()).all()
    assert llm.traffic().sum() == 0  # reset after reading
    # a request arriving later, on rank 0 only: the other ranks keep stepping (idle) in lock-step
    rid = llm.add_request(PROMPTS[0], _params(5))
    got = []
    step = 0
    while llm._keep_going(llm.has_unfinished()):
        if step == 2 and rank == 0:
            rid2 = llm.add_request(PROMPTS[2], _params(3))
        for o in llm.step():
            if o.finished:
                got.append((o.request_id, o.completion.token_ids))
        step += 1
    assert dict(got)[rid] == refs[0][:5]
    if rank == 0:
        assert dict(got)[rid2] == refs[2][:3]
    llm.check_blocks()
    shutdown(ctx)


@pytest.mark.parametrize("world, interleaved", [(2, False), (2, True), (4, True)])
def test_ep_serving_equals_one_process(tmp_path, world, interleaved):
    model = hf_folder(tmp_path, "qwen3_moe")
    refs = [hf_greedy(model, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    one = LLM(str(tmp_path), device="cpu", block_size=4)
    assert [o.token_ids for o in one.generate(PROMPTS, [_params(n) for n in LENGTHS], use_tqdm=False)] == refs
    rows = [[(e * 3 + layer) % world for e in range(E)] for layer in range(LAYERS)] if interleaved else None
    if rows:  # every rank holds E / world experts in each layer
        assert all(sorted(r).count(g) == E // world for r in rows for g in range(world))
    run_ranks(_check, world, str(tmp_path), refs, rows)


def _bad_world(rank, world, path):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    with pytest.raises(ValueError, match="do not divide"):
        LLM(path, device="cpu", parallel=ctx)
    shutdown(ctx)


def test_a_world_size_that_does_not_divide_the_experts_is_one_clear_error(tmp_path):
    hf_folder(tmp_path, "qwen3_moe", num_experts=6)
    run_ranks(_bad_world, 4, str(tmp_path))


def test_moestack_generate_under_torchrun_on_a_hf_folder(tmp_path, capsys):
    """`torchrun ... moestack generate --model HF_FOLDER` runs the EP engine; rank 0 prints what one process prints."""
    import os
    import subprocess
    import sys

    from moestack.cli import main

    hf_folder(tmp_path, "qwen3_moe")
    args = ["generate", "--model", str(tmp_path), "--prompt", "def f(x):", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    want = capsys.readouterr().out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moestack.cli",
           *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == want and want.startswith("def f(x):")


def test_run_folders_are_refused_under_ep_before_anything_loads(tmp_path):
    from moestack.parallel.mesh import ParallelContext

    (tmp_path / "config.toml").write_text("")  # a moestack run folder's marker
    with pytest.raises(ValueError, match="Hugging Face checkpoint folders"):
        LLM(str(tmp_path), device="cpu", parallel=ParallelContext(world=2, ep=2))


def test_serve_under_torchrun_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from moestack.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "runs in one process" in capsys.readouterr().err
