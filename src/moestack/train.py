"""The training loop: AdamW, warmup + cosine, clipping, bf16 autocast on GPU, eval, logs, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moestack.checkpoint import CheckpointError, CheckpointManager
from moestack.checkpoint.storage import list_committed
from moestack.config import Config, ConfigError, check_capacity, load_config, to_toml
from moestack.data import Corpus
from moestack.metrics import MetricsLog, load_balance, plot_run
from moestack.models.transformer import MoETransformer
from moestack.moe.experts import GroupedExperts
from moestack.parallel import ep as ep_parallel
from moestack.parallel.apply import parallelize, sharding_of
from moestack.parallel.mesh import ParallelContext, init_parallel, shutdown
from moestack.state import flatten_state, restore_state

log = logging.getLogger("moestack")


def default_run_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """AdamW (decay on matrices only) and a linear-warmup cosine schedule down to min_lr_ratio * lr."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def factor(step: int) -> float:
        if step < t.warmup:
            return (step + 1) / t.warmup
        progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Trainer:
    """Owns the model, optimizer, data and run folder of one training run."""

    cfg: Config
    ctx: ParallelContext
    run_dir: Path
    resuming: bool = False
    model: MoETransformer = field(init=False)
    step: int = 0

    def __post_init__(self):
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.train.seed)
        self.model = MoETransformer(cfg).to(ctx.device)
        self.forward = parallelize(self.model, ctx, cfg.parallel)
        self.sharding = sharding_of(self.model)  # the FSSDP driver, or None
        self.sharding_row: dict = {}
        if cfg.train.compile:
            # decide the expert GEMM path eagerly: a failing probe cannot be caught inside a traced graph
            dtype = autocast_dtype(cfg, ctx.device) or torch.float32
            for experts in self.model.modules():
                if isinstance(experts, GroupedExperts):
                    experts.use_grouped_mm(torch.empty(0, experts.d_model, device=ctx.device, dtype=dtype))
            self.forward = torch.compile(self.forward)
        self.opt, self.sched = build_optimizer(self.model, cfg)
        self.corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
        self.rows = ctx.batch_rows(cfg.train.batch_size)
        self.prepare_run_dir()  # only now: every input above was valid
        self.autocast = autocast_for(cfg, ctx.device)
        self.tokens_at_save = self.tokens_seen()
        self.tokens_at_log = self.tokens_at_save
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, group=ctx.grad_group)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    def prepare_run_dir(self) -> None:
        """Create the run folder and write config.toml; on resume first check the model matches the run's."""
        ctx, path = self.ctx, self.run_dir / "config.toml"
        if self.resuming and path.is_file():
            check_same_model(load_config(path), self.cfg, path)  # every rank, so all raise together
        if not self.resuming and path.is_file():  # every rank sees the shared folder: all raise together
            raise ConfigError(f"{self.run_dir} already holds a run (config.toml); pass --resume to continue it, "
                              "or choose another --run-dir (a run's config.toml used as --config carries its run_dir)")
        self._barrier()
        self._saved_config = path.read_text() if ctx.is_main and self.resuming and path.is_file() else None
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(to_toml(self.cfg))
            if not self.resuming:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self._barrier()

    def restore_config(self) -> None:
        """Put back the config.toml this resume replaced (the resume was refused)."""
        if self.ctx.is_main and self._saved_config is not None:
            (self.run_dir / "config.toml").write_text(self._saved_config)
        self.ckpt.close()

    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier(group=self.ctx.stats_group)

    def _rank0_says(self, flag: bool) -> bool:
        """Rank 0's answer on every rank, so that all ranks take the same branch into collectives."""
        if not self.ctx.distributed:
            return flag
        box = [flag]
        dist.broadcast_object_list(box, src=0, group=self.ctx.stats_group)
        return bool(box[0])

    # ---- statistics -------------------------------------------------------------------------
    def tokens_seen(self) -> torch.Tensor:
        """Token-choices per global expert per MoE layer since the start, over all ranks: [L, E] int64."""
        counts = torch.stack([m.tokens_seen for m in self.model.moe_layers()]).clone()
        if self.ctx.distributed:
            dist.all_reduce(counts, group=self.ctx.stats_group)
        return counts.cpu()

    def mean(self, value: torch.Tensor) -> float:
        """Average of a scalar over ranks."""
        value = value.detach().float().clone()
        if self.ctx.distributed:
            dist.all_reduce(value, group=self.ctx.stats_group)
            value /= self.ctx.world
        return value.item()

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """Forward, backward and update on this step's batch: (loss, aux) averaged over ranks."""
        x, y = self.corpus.batch("train", self.step, self.cfg.train.batch_size, self.cfg.train.seed, self.rows)
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        self.model.train()
        if self.sharding is not None:  # re-shard when due, and plan this step's expert copies
            self.sharding.prepare(self.step, self.opt)
        with self.autocast:
            _, loss, aux = self.forward(x, y)
        (loss + aux).backward()
        ep_parallel.finish_gradients(self.model, self.ctx)
        if self.cfg.train.grad_clip > 0:
            ep_parallel.clip_grad_norm(self.model, self.cfg.train.grad_clip, self.ctx)
        # the last checkpoint's device-to-host copy ran during forward and backward; from here on the
        # saved state changes in place (optimizer, scheduler, router bias), so it must be complete
        self.ckpt.wait_snapshot()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.cfg.moe.bias_balancing:
            self.update_router_bias()
        if self.sharding is not None:
            self.sharding_row = self.sharding.record()
        self.step += 1
        return self.mean(loss), self.mean(aux)

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing: nudge each router's bias by this step's global loads."""
        for m in self.model.moe_layers():
            counts = m.last_routing.counts.clone()
            if self.ctx.distributed:
                dist.all_reduce(counts, group=self.ctx.stats_group)
            m.router.update_bias(counts, self.cfg.moe.bias_update_rate)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over eval_batches global batches (the same batches every time)."""
        self.model.eval()
        saved = [m.tokens_seen.clone() for m in self.model.moe_layers()]
        total = 0.0
        for i in range(self.cfg.train.eval_batches):
            x, y = self.corpus.batch("val", i, self.cfg.train.batch_size, self.cfg.train.seed, self.rows)
            with self.autocast:
                _, loss, _ = self.forward(x.to(self.ctx.device), y.to(self.ctx.device))
            total += self.mean(loss)
        for m, s in zip(self.model.moe_layers(), saved):  # eval tokens are not training load
            m.tokens_seen.copy_(s)
        return total / self.cfg.train.eval_batches

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, full: bool = False) -> None:
        now = self.tokens_seen()
        tensors, experts = flatten_state(self.model, self.opt, now)
        meta = {"step": self.step, "config": to_toml(self.cfg)}
        self.ckpt.save(self.step, tensors, experts, meta, expert_tokens=now - self.tokens_at_save, full=full)
        self.tokens_at_save = now

    def resume(self) -> bool:
        """Continue from the newest good checkpoint; False if the run has none.

        Checkpoints that exist but are all damaged are an error (CheckpointError naming each problem), not
        a silent start from step 0: the next commit would move them aside."""
        if not self._rank0_says(bool(list_committed(self.ckpt.root)) if self.ctx.is_main else False):
            return False
        self._init_optimizer_state()
        _, experts = flatten_state(self.model, self.opt, self.tokens_seen())
        try:
            tensors, meta, report = self.ckpt.load(experts_wanted=experts)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}. `moestack ckpt verify {self.run_dir}` lists the "
                                  "damage; repair or move the damaged checkpoints, or train without --resume") from None
        self.resume_report = report
        tokens = restore_state(self.model, self.opt, tensors)
        for m, row in zip(self.model.moe_layers(), tokens):  # the global count, held once
            m.tokens_seen.copy_(row if self.ctx.is_main else torch.zeros_like(row))
        self.step = int(meta["step"])
        self.sched.last_epoch = self.step
        for g, base in zip(self.opt.param_groups, self.sched.base_lrs):
            g["lr"] = base * self.sched.lr_lambdas[0](self.step)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.tokens_at_save = self.tokens_at_log = self.tokens_seen()
        if self.ctx.is_main:
            self.metrics.keep_until(self.step)  # steps after the checkpoint will be logged again
            log.info("resuming at step %d", self.step)
        return True

    def _init_optimizer_state(self) -> None:
        """Create AdamW's state tensors so checkpoints can describe (and reshard) them before loading."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                st = self.opt.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to `train.steps`. In one process, Ctrl-C stops after the current step with a full checkpoint
        (a second Ctrl-C aborts at once); summary["interrupted"] says so."""
        with logging_redirect_tqdm(loggers=[log]), _stop_on_interrupt(enabled=not self.ctx.distributed) as stop:
            summary = self._run(stop)
        return summary

    def _run(self, stop: dict) -> dict:
        t, ctx = self.cfg.train, self.ctx
        if not self.cfg.checkpoint.every and ctx.is_main:
            log.warning("checkpoint.every = 0: this run keeps no checkpoint, so eval, generate, sparsify and "
                        "--resume will have nothing to load")
        bar = tqdm(total=t.steps, initial=self.step, disable=not ctx.is_main, desc="train", unit="step")
        summary: dict = {}
        if self.step == 0:
            summary["first_val_loss"] = self.evaluate()
            self.metrics.write({"step": 0, "val_loss": summary["first_val_loss"]}) if ctx.is_main else None
        tic, tokens, loss = time.perf_counter(), 0, float("nan")
        postfix: dict = {}
        while self.step < t.steps:
            loss, aux = self.train_step()
            tokens += t.batch_size * self.cfg.model.seq_len
            bar.update(1)
            postfix["loss"] = f"{loss:.3f}"
            bar.set_postfix(postfix)
            row = None
            if self.step % t.log_every == 0 or self.step == t.steps:
                row = self._log_row(loss, aux, tokens / (time.perf_counter() - tic))
                tic, tokens = time.perf_counter(), 0
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                row = row or {"step": self.step, "loss": loss}
                row["val_loss"] = summary["val_loss"] = self.evaluate()
                postfix["val"] = f"{summary['val_loss']:.3f}"
                bar.set_postfix(postfix)
            if row is not None and ctx.is_main:
                self.metrics.write(row)
            every = self.cfg.checkpoint.every
            if stop["asked"]:  # Ctrl-C: keep everything trained so far, then leave
                summary["interrupted"] = True
                if every:
                    self.save_checkpoint(full=True)
                break
            if every and (self.step % every == 0 or self.step == t.steps or self.ckpt.deferred is not None):
                self.save_checkpoint(full=self.step == t.steps)  # the final model keeps every expert
        bar.close()
        self.ckpt.wait()
        summary.update(step=self.step, loss=loss)
        expert_tokens = self.tokens_seen()  # a collective: every rank takes part
        if ctx.is_main:
            plot_run(self.metrics.rows, expert_tokens.numpy(), self.run_dir / "loss.png")
        return summary

    def _log_row(self, loss: float, aux: float, tok_per_s: float) -> dict:
        now = self.tokens_seen()
        balance = load_balance((now - self.tokens_at_log).numpy())
        self.tokens_at_log = now
        row = {
            "step": self.step, "loss": loss, "aux_loss": aux, "lr": self.sched.get_last_lr()[0],
            "tokens_per_s": tok_per_s, "load_max_over_mean": [round(float(b), 4) for b in balance],
        }
        if self.cfg.moe.capacity_factor > 0:  # never under EP (refused); under data parallelism: rank 0's tokens
            row["dropped"] = [m.dropped for m in self.model.moe_layers()]
        row.update(self.sharding_row)  # FSSDP: bytes materialized, gathered and reduced in the last step
        return row


def check_same_model(saved: Config, cfg: Config, path: Path) -> None:
    """Refuse to resume a run with a different model or MoE shape than the one it was trained with."""
    for section in ("model", "moe"):
        old, new = getattr(saved, section), getattr(cfg, section)
        for name, value in vars(old).items():
            if getattr(new, name) != value:
                raise ConfigError(
                    f"--resume: {section}.{name}={getattr(new, name)!r} but the run in {path.parent} was trained with "
                    f"{value!r} ({path}); drop the override or start a new --run-dir"
                )


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (or when asked), None (fp32, no autocast) on the CPU."""
    dtype = cfg.train.dtype
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU (or when asked), nothing on the CPU in fp32."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@contextlib.contextmanager
def _stop_on_interrupt(enabled: bool):
    """While active, the first SIGINT only sets stop["asked"] (the loop stops at a step boundary); a second
    one raises KeyboardInterrupt. Off under torchrun (ranks could stop at different steps) and off the main
    thread (signal handlers live there)."""
    stop = {"asked": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log.warning("interrupted: stopping after this step with a full checkpoint (Ctrl-C again to abort at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(cfg: Config, resume: bool = False) -> dict:
    """Train with `cfg` (under torchrun: expert parallel); returns a summary of the run."""
    ctx = init_parallel(cfg.parallel, cfg.train.device, cfg.moe.num_experts)
    try:
        check_capacity(cfg, ctx.ep)
        if ctx.is_main and ctx.distributed:
            mode = "expert parallel" if cfg.parallel.mode == "ep" else "experts fully sharded (FSSDP)"
            log.info("%d ranks: %s over %d, data parallel over %d", ctx.world, mode, ctx.ep, ctx.dp)
        run_dir = Path(cfg.train.run_dir or default_run_dir())
        trainer = Trainer(cfg, ctx, run_dir, resuming=resume)
        resumed = resume and trainer.resume()
        if resume and not resumed and ctx.is_main:
            log.warning("--resume: no checkpoint in %s, starting from step 0", run_dir / "ckpt")
        if resumed and trainer.step >= cfg.train.steps:
            trainer.restore_config()
            raise ConfigError(f"--resume: the run in {run_dir} is already at step {trainer.step}; --steps is the total "
                              f"number of steps, so pass more than {trainer.step} to train further")
        summary = trainer.run()
        summary["run_dir"] = str(run_dir)
        trainer.ckpt.close()
        return summary
    finally:
        shutdown(ctx)
