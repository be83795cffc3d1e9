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


TOP_K, D_MODEL, FP32 = 2, 32, 4
KV_ROW = 2 * 2 * 8 * FP32  # keys and values of one token in one block (tiny qwen3_moe: 2 kv heads of 8)
META = 12  # follow flow: bytes of routing metadata per MoE row (serve/follow.py)


def _check(rank, world, path, refs, placement_rows, flow):
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    placement = Placement(world, placement_rows) if placement_rows else None
    llm = LLM(path, device="cpu", block_size=4, parallel=ctx, placement=placement, ep_flow=flow)
    assert llm.model.moe_layers()[0].experts.w13.shape[0] == E // world  # this rank keeps its experts only
    forwarded, sampled = [], []  # tokens of every forward on this rank (idle ones included), rows sampled
    hidden = llm.model.hidden

    def counting(tokens, *a, rows=None, **kw):
        forwarded.append(tokens.numel())
        sampled.append(tokens.numel() if rows is None else rows.numel())
        return hidden(tokens, *a, rows=rows, **kw)

    llm.model.hidden = counting
    outs = llm.generate(PROMPTS, [_params(n) for n in LENGTHS], use_tqdm=False)
    assert [o.token_ids for o in outs] == refs  # every rank returns the whole list, in order
    sent = llm.traffic()
    moe = sent["moe"]
    assert moe.shape == (LAYERS, world, world) and sent["kv"].shape == (LAYERS, world, world)
    assert (moe.sum(0) > 0).all()
    per_layer = moe.sum((1, 2))
    if flow == "home":
        assert torch.equal(moe, moe.transpose(1, 2))  # a -> b dispatch rows come back b -> a in the combine
        tokens = torch.tensor([sum(forwarded)])
        torch.distributed.all_reduce(tokens, group=ctx.ep_group)
        # every token-choice of every forward travels out (dispatch) and back (combine), to itself included
        assert (per_layer == 2 * TOP_K * D_MODEL * FP32 * tokens.item()).all()
        assert sent["kv"].sum() == 0 and sent["sample"].sum() == 0
    else:  # every rank forwards the whole batch; each token's rows go out and back once, wherever it is
        T = sum(forwarded)
        assert (per_layer == 2 * TOP_K * (D_MODEL * FP32 + META) * T).all()
        # every token's keys and values reach every rank, each sampled row too
        assert (sent["kv"].sum((1, 2)) == T * world * (KV_ROW + 4)).all()
        assert sent["kv"][0].diagonal().sum() == T * (KV_ROW + 4)  # what each rank keeps for itself
        assert sent["sample"].sum() == sum(sampled) * world * (D_MODEL * FP32 + 4)
    assert all(m.sum() == 0 for m in llm.traffic().values())  # reset after reading
    # a request arriving later: under home on rank 0 only (the other ranks keep stepping, idle, in lock-step);
    # under follow on every rank, as every request is
    rid = llm.add_request(PROMPTS[0], _params(5))
    got = []
    step = 0
    while llm._keep_going(llm.has_unfinished()):
        if step == 2 and (rank == 0 or flow == "follow"):
            rid2 = llm.add_request(PROMPTS[2], _params(3))
        for o in llm.step():
            if o.finished:
                got.append((o.request_id, o.completion.token_ids))
        step += 1
    assert dict(got)[rid] == refs[0][:5]
    if rank == 0 or flow == "follow":
        assert dict(got)[rid2] == refs[2][:3]
    llm.check_blocks()
    if flow == "follow":  # unseeded sampling draws the same tokens on every rank, whatever each rank's own RNG
        from moestack.serve.ep import gather_objects

        torch.manual_seed(100 + rank)
        sampled = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True),
                               use_tqdm=False)
        mine = [o.token_ids for o in sampled]
        assert all(theirs == mine for theirs in gather_objects(mine, ctx))
    if flow == "follow":  # one rank adding a request alone is one clear error, on every rank
        if rank == 0:
            llm.add_request(PROMPTS[1], _params(2))
        with pytest.raises(RuntimeError, match="every rank must add and abort the same requests"):
            llm.step()
    shutdown(ctx)


@pytest.mark.parametrize("world, interleaved, flow", [(2, False, "home"), (2, True, "home"), (4, True, "home"),
                                                      (2, False, "follow"), (2, True, "follow"), (4, True, "follow")])
def test_ep_serving_equals_one_process(tmp_path, world, interleaved, flow):
    model = hf_folder(tmp_path, "qwen3_moe")
    refs = [hf_greedy(model, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    one = LLM(str(tmp_path), device="cpu", block_size=4)
    assert [o.token_ids for o in one.generate(PROMPTS, [_params(n) for n in LENGTHS], use_tqdm=False)] == refs
    rows = [[(e * 3 + layer) % world for e in range(E)] for layer in range(LAYERS)] if interleaved else None
    if rows:  # every rank holds E / world experts in each layer
        assert all(sorted(r).count(g) == E // world for r in rows for g in range(world))
    run_ranks(_check, world, str(tmp_path), refs, rows, flow)


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


def test_bad_ep_flows_are_one_clear_error_each(tmp_path):
    hf_folder(tmp_path, "qwen3_moe")
    with pytest.raises(ValueError, match="expected one of home, follow"):
        LLM(str(tmp_path), device="cpu", ep_flow="sideways")
    with pytest.raises(ValueError, match="flow of expert-parallel serving"):
        LLM(str(tmp_path), device="cpu", ep_flow="follow")


def test_a_model_that_drops_over_capacity_is_refused_under_ep(tmp_path):
    from moestack.parallel.mesh import ParallelContext
    from moestack.serve.ep import shard_for_serving
    from moestack.serve.loader import load

    hf_folder(tmp_path, "qwen3_moe")
    model = load(str(tmp_path)).model
    model.moe_layers()[0].dispatcher.capacity_factor = 1.25  # as a run trained with moe.capacity_factor serves
    with pytest.raises(ValueError, match="serve it in one process"):
        shard_for_serving(model, ParallelContext(world=2, ep=2))
