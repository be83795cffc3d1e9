"""ScMoE under expert parallelism: overlapped and sequential schedules agree exactly, and match one process."""

import json

import torch

from moestack.config import ParallelConfig, load_config
from moestack.models.transformer import MoETransformer
from moestack.parallel.ep import clip_grad_norm, finish_gradients, parallelize
from moestack.parallel.mesh import init_parallel, shutdown
from moestack.train import train
from tests.dist import run_ranks

TINY = {"model.d_model": "32", "model.n_heads": "2", "model.n_layers": "3", "model.seq_len": "16",
        "moe.num_experts": "4", "moe.d_ff": "32", "model.arch": "scmoe"}


def _grads(model, idx):
    model.zero_grad()
    logits, loss, aux = model(idx, idx)
    (loss + aux).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _schedules(rank, world, position):
    cfg = load_config(overrides={**TINY, "model.scmoe_position": position, "parallel.ep": str(world)})
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    idx = torch.randint(0, 256, (2 * world, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = MoETransformer(cfg)
    ref_logits, ref_grads = _grads(ref, idx)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    parallelize(model, ctx, for_training=False)
    mine = idx[2 * rank: 2 * rank + 2]
    model.overlap = True
    logits_a, grads_a = _grads(model, mine)
    model.overlap = False
    logits_b, grads_b = _grads(model, mine)
    assert torch.equal(logits_a, logits_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    torch.testing.assert_close(logits_a, ref_logits[2 * rank: 2 * rank + 2], atol=1e-5, rtol=1e-5)
    # each rank's loss is its own mean (+ the global aux): the ranks' gradients sum to world x the reference's
    experts = {n: m.global_ids for n, m in model.named_modules() if hasattr(m, "global_ids")}
    for name, grad in grads_a.items():
        owner = name.rsplit(".", 1)[0]
        if owner in experts:  # sharded: compare this rank's slice
            want = ref_grads[name][torch.tensor(experts[owner])]
        else:
            torch.distributed.all_reduce(grad)
            want = ref_grads[name]
        torch.testing.assert_close(grad / world, want, atol=1e-5, rtol=1e-4, msg=name)
    shutdown(ctx)


def test_overlapped_and_sequential_schedules_agree_exactly_under_ep():
    run_ranks(_schedules, 2, "prev_attn")
    run_ranks(_schedules, 2, "block_input")


ARCHS = ("top2", "shared_top1", "scmoe")


def _arch_config(arch, run_dir, **extra):
    return load_config(overrides={**TINY, "model.arch": arch, "train.steps": "3", "train.batch_size": "4",
                                  "train.eval_batches": "1", "train.log_every": "1", "train.device": "cpu",
                                  "train.run_dir": run_dir, **extra})


def _train_archs(rank, world, run_root):
    torch.distributed.init_process_group("gloo")  # train() joins it instead of starting its own each time
    for arch in ARCHS:
        summary = train(_arch_config(arch, f"{run_root}/{arch}", **{"parallel.ep": "2"}))
        assert summary["step"] == 3 and summary["val_loss"] < summary["first_val_loss"]
    train(_arch_config("top2", f"{run_root}/top2-dp", **{"parallel.ep": "1"}))  # data parallel only


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_each_arch_trains_under_ep2_with_the_single_process_losses(tmp_path):
    """The whole trainer under EP=2 (DDP for replicated parameters, expert gradients, clipping, AdamW) gives
    one process's losses for every arch, and so does --ep 1 (data parallel only) on 2 ranks."""
    run_ranks(_train_archs, 2, str(tmp_path / "ep2"))
    for arch, run in [(arch, arch) for arch in ARCHS] + [("top2", "top2-dp")]:
        if run == arch:
            train(_arch_config(arch, str(tmp_path / "one" / arch)))
        want, got = _losses(tmp_path / "one" / arch), _losses(tmp_path / "ep2" / run)
        assert sorted(got) == [1, 2, 3]
        for step in got:
            assert abs(got[step] - want[step]) < 5e-6, (arch, step, got[step], want[step])



def _trainer_gradients(rank, world):
    """The trainer's gradient path under EP (DDP, finish_gradients, clip_grad_norm with clipping active)
    gives each parameter the single-process gradient of the whole batch, for every arch."""
    ctx = init_parallel(ParallelConfig(ep=world), "cpu")
    idx = torch.randint(0, 256, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    for arch in ARCHS:
        cfg = load_config(overrides={**TINY, "model.arch": arch, "parallel.ep": str(world)})
        torch.manual_seed(0)
        ref = MoETransformer(cfg)
        _, loss, aux = ref(idx, idx)
        (loss + aux).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm > 0.05  # clipping is active, so a wrongly scaled gradient also moves the others
        torch.manual_seed(0)
        model = MoETransformer(cfg)
        forward = parallelize(model, ctx)
        _, loss, aux = forward(idx[2 * rank: 2 * rank + 2], idx[2 * rank: 2 * rank + 2])
        (loss + aux).backward()
        finish_gradients(model, ctx)
        clip_grad_norm(model, 0.05, ctx)
        want = dict(ref.named_parameters())
        experts = {n: m.global_ids for n, m in model.named_modules() if hasattr(m, "global_ids")}
        for name, p in model.named_parameters():
            owner = name.rsplit(".", 1)[0]
            ref_grad = want[name].grad
            if owner in experts:
                ref_grad = ref_grad[torch.tensor(experts[owner])]
            torch.testing.assert_close(p.grad, ref_grad, atol=1e-6, rtol=1e-4, msg=f"{arch} {name}")
    shutdown(ctx)


def test_trainer_gradients_under_ep2_equal_the_single_process_ones():
    run_ranks(_trainer_gradients, 2)
