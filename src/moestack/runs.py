"""Using a trained run: load its model (under EP when started by torchrun), evaluate it, trace its routing."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from moestack.checkpoint import CheckpointError, CheckpointManager
from moestack.config import Config, ConfigError, load_config
from moestack.data import Corpus
from moestack.models.transformer import MoETransformer
from moestack.parallel.apply import parallelize
from moestack.parallel.mesh import ParallelContext, init_parallel, pick_device, shutdown, world_from_env
from moestack.placement.placement import Placement
from moestack.train import autocast_for
from moestack.state import expert_param_names

log = logging.getLogger("moestack")


def run_config(run_dir: str | Path, device: str = "auto", placement: str | None = None, local: bool = False) -> Config:
    """The run's config.toml, set up for inference on this launch (every rank expert parallel; local: the whole
    model in this process)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a moestack run folder (no config.toml); pass the --run-dir of a training run")
    cfg = load_config(path)
    world = 1 if local else world_from_env()[1]
    if cfg.moe.num_experts % world:
        raise ConfigError(
            f"{world} ranks cannot share the run's {cfg.moe.num_experts} experts evenly; "
            f"launch a number of ranks that divides {cfg.moe.num_experts}"
        )
    if cfg.moe.capacity_factor > 0 and world > 1:
        raise ConfigError(
            f"{run_dir} was trained with moe.capacity_factor={cfg.moe.capacity_factor} (tokens over capacity dropped), "
            "which expert parallelism does not support; run this command in one process, without torchrun"
        )
    if placement is None:
        placement = _training_placement_for(cfg.parallel.placement, world)
    par = replace(cfg.parallel, ep=world, dp=1, placement=placement)
    return replace(cfg, parallel=par, train=replace(cfg.train, device=device)).validate()


def _training_placement_for(path: str, world: int) -> str:
    """The run's training placement if this launch has its number of ranks, else none (experts contiguous):
    the checkpoint loads into any expert layout, so eval, generate and trace run on any number of ranks."""
    if not path or world == 1:
        return ""
    if Placement.load(path).num_gpus == world:
        return path
    log.info("the run's placement %s is for another number of ranks; experts placed contiguously over %d", path, world)
    return ""


def load_model(run_dir: str | Path, device: str = "auto", placement: str | None = None, local: bool = False):
    """(model, cfg, ctx) with the newest good checkpoint's weights; under torchrun experts are sharded, unless
    `local` (every expert in this process, no collective: the serving engine shards a run itself)."""
    cfg = run_config(run_dir, device, placement, local)
    if local:
        ctx = ParallelContext(device=pick_device(cfg.train.device))
    else:
        ctx = init_parallel(cfg.parallel, cfg.train.device, cfg.moe.num_experts)
    try:
        model = MoETransformer(cfg).to(ctx.device)
        parallelize(model, ctx, cfg.parallel, for_training=False)
        mgr = CheckpointManager(Path(run_dir), cfg.checkpoint, group=ctx.grad_group)
        # load() is collective: it plans on rank 0 and raises the same CheckpointError on every rank
        wanted = {f"model.{n}": shard for n, shard in _expert_layout(model).items()}
        tensors, meta, _ = mgr.load(experts_wanted=wanted)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    except BaseException:
        shutdown(ctx)
        raise
    model.eval()
    return model, cfg, ctx


def _expert_layout(model):
    from moestack.checkpoint import ExpertShard

    return {name: ExpertShard(layer, ids) for name, (layer, ids) in expert_param_names(model).items()}


@torch.no_grad()
def evaluate_run(run_dir, batches: int | None = None, device: str = "auto"):
    """Validation loss and perplexity over `batches` global batches of the run's validation split (rank 0)."""
    model, cfg, ctx = load_model(run_dir, device)
    try:
        result = evaluate(model, cfg, ctx, batches)
        return result if ctx.is_main else None
    finally:
        shutdown(ctx)


@torch.no_grad()
def evaluate(model, cfg: Config, ctx: ParallelContext, batches: int | None = None) -> dict:
    """Mean validation loss (over ranks) of `model` on the run's data, over `batches` global batches (default:
    the run's train.eval_batches, so the figure is the one training logged for the same weights)."""
    batches = batches or cfg.train.eval_batches
    corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
    rows = ctx.batch_rows(cfg.train.batch_size)
    total = torch.zeros((), device=ctx.device)
    for i in tqdm(range(batches), desc="eval", unit="batch", leave=False, disable=not ctx.is_main):
        x, y = corpus.batch("val", i, cfg.train.batch_size, cfg.train.seed, rows)
        with autocast_for(cfg, ctx.device):  # the precision training evaluated in
            total += model(x.to(ctx.device), y.to(ctx.device))[1].float()
    if ctx.distributed:
        dist.all_reduce(total, group=ctx.stats_group)
        total /= ctx.world
    loss = total.item() / batches
    return {"val_loss": loss, "perplexity": math.exp(loss), "batches": batches}


@torch.no_grad()
def record_trace(run_dir, tokens: int, out: str, device: str = "auto", batch_size: int = 8):
    """Run the trained model on held-out tokens and save a routing trace (.npz) for `moestack plan`."""
    from moestack.placement.trace import TraceRecorder, check_trace_path

    if world_from_env()[1] > 1:
        raise ConfigError("moestack trace runs in one process; start it without torchrun")
    check_trace_path(out)  # before the recording, not after it
    model, cfg, ctx = load_model(run_dir, device)
    layers = model.moe_layers()
    recorder = TraceRecorder(len(layers), cfg.moe.num_experts, layers[0].router.top_k)
    corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
    steps = max(1, -(-tokens // (batch_size * cfg.model.seq_len)))
    for i in tqdm(range(steps), desc="trace", unit="batch"):
        x, _ = corpus.batch("val", 10_000 + i, batch_size, cfg.train.seed)
        with autocast_for(cfg, ctx.device):  # route as the run trains and serves (bf16 on a GPU)
            model(x.to(ctx.device))
        for index, layer in enumerate(layers):
            recorder.record(index, layer.last_routing.expert_ids)
    trace = recorder.trace()
    trace.save(out)
    return trace
