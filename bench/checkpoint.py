"""Checkpoint overhead of an MoE training state: torch.save vs DCP save / async_save vs moestack (MoC).

    python bench/checkpoint.py                          # CPU: a tiny state (~20M parameters)
    python bench/checkpoint.py --params 1.1e9           # CUDA default: >= 1B parameters on one GPU
    python bench/checkpoint.py --train-steps 200 --every 50   # also: training throughput with checkpoints
                                                              # (a synthetic step of --step-ms)
    torchrun --standalone --nproc_per_node 2 bench/checkpoint.py   # expert parallel: each rank holds E/N
                                                                   # experts and the replicated rest

For each method: the time the training loop is blocked per checkpoint, the time until the checkpoint is
committed (durable on disk), and the bytes written; medians over --reps after one warm-up save. moestack's
blocked time includes its wait for the snapshot's device-to-host copy (CUDA), which the measured saves take
right away (no step to overlap); the throughput loop waits just before its in-place update instead.
The state is moestack-like: dense tensors, expert-stacked tensors [E, d, f] and AdamW moments for all
(fp32: 12 bytes per parameter). Prints a table and appends one JSON line per method to
$OUT/checkpoint.jsonl (or bench/results/checkpoint.jsonl).
Under torchrun every rank saves its own share (torch.save: its whole local state; DCP: its experts under
rank-specific keys, the replicated tensors once; moestack: its share, collectively); a rank's times are
the slowest rank's, since the next step waits for it. Only rank 0 prints and writes results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moestack.checkpoint import CheckpointConfig, CheckpointManager, ExpertShard, storage

METHODS = ("torch_save", "dcp_save", "dcp_async_save", "moestack_full", "moestack_pec")
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets them


def say(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def _barrier() -> None:
    if WORLD > 1:
        dist.barrier()


def _slowest(value: float) -> float:
    """The largest value over the ranks (what the next collective step waits for)."""
    if WORLD == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _total(value: int) -> int:
    if WORLD == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def parse_args() -> argparse.Namespace:
    """Command line; sizes default to tiny on CPU and >= 1B parameters on CUDA."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--params", type=float, default=None, help="parameters (default 2e7 on CPU, 1.1e9 on CUDA)")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer (default 8 CPU, 16 CUDA)")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="expert hidden size")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--reps", type=int, default=3, help="measured saves per method (after 1 warm-up)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--train-steps", type=int, default=0, help="also time a synthetic training loop (0 = off)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps in the throughput loop")
    p.add_argument("--step-ms", type=float, default=None, help="synthetic step time (default 100 CUDA, 50 CPU)")
    p.add_argument("--write-chunk-mb", type=int, default=None, help="moestack: bytes per write/hash call (MiB)")
    p.add_argument("--writers", type=int, default=None, help="moestack: files written at once per rank")
    p.add_argument("--when-busy", default="wait", choices=("wait", "skip", "defer"),
                   help="moestack: a checkpoint due while the previous one persists (throughput loop)")
    p.add_argument("--no-early-writeback", action="store_true",
                   help="moestack: leave the page cache's writeback to the final fsync (the previous behaviour)")
    return p.parse_args()


# ---------------------------------------------------------------------------- the state


def sizes(args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """Model dimensions; the number of layers is the smallest reaching --params."""
    gpu = device.type == "cuda"
    d = args.d_model or (2048 if gpu else 256)
    f = args.ffn or (1408 if gpu else 512)
    e = args.experts or (16 if gpu else 8)
    v = args.vocab or (32000 if gpu else 8192)
    target = args.params or (1.1e9 if gpu else 2e7)
    per_layer = 4 * d * d + 3 * e * d * f + e * d + 2 * d
    layers = max(1, math.ceil((target - 2 * v * d) / per_layer))
    return {"d": d, "f": f, "experts": e, "vocab": v, "layers": layers, "params": 2 * v * d + layers * per_layer}


def build_state(s: dict[str, int], device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, ExpertShard]]:
    """Flat training state: parameters plus AdamW exp_avg / exp_avg_sq, experts stacked on dim 0 (this
    rank's E / world_size experts under torchrun)."""
    d, f = s["d"], s["f"]
    if s["experts"] % WORLD:
        raise SystemExit(f"--experts {s['experts']} does not divide over {WORLD} ranks: pick a multiple of {WORLD}")
    e = s["experts"] // WORLD
    mine = tuple(range(RANK * e, (RANK + 1) * e))
    params: dict[str, tuple[int, ...]] = {"embed.weight": (s["vocab"], d), "lm_head.weight": (s["vocab"], d)}
    experts: dict[str, ExpertShard] = {}
    for i in range(s["layers"]):
        pre = f"layers.{i}"
        params.update({f"{pre}.attn.qkv": (3 * d, d), f"{pre}.attn.out": (d, d), f"{pre}.norm1": (d,),
                       f"{pre}.norm2": (d,), f"{pre}.moe.router": (s["experts"], d)})
        for w, shape in (("w1", (e, d, f)), ("w3", (e, d, f)), ("w2", (e, f, d))):
            params[f"{pre}.moe.experts.{w}"] = shape
    tensors: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in params.items():
        tensors[f"model.{name}"] = torch.randn(shape, device=device, generator=gen) * 0.02
        tensors[f"optim.{name}.exp_avg"] = torch.zeros(shape, device=device)
        tensors[f"optim.{name}.exp_avg_sq"] = torch.full(shape, 1e-8, device=device)
        if ".moe.experts." in name:
            layer = int(name.split(".")[1])
            for key in (f"model.{name}", f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"):
                experts[key] = ExpertShard(layer, mine)
    tensors["optim.step"] = torch.tensor(1.0)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, experts


# ---------------------------------------------------------------------------- one saver per method
# saver(state, work, step) -> (blocked_s, committed_s, bytes): committed_s counts from the call until the
# checkpoint is durable on disk. saver.start(...) saves inside the throughput loop; saver.wait_snapshot()
# comes right before the loop's in-place update of the state; saver.close() finishes.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sync_stream(device: torch.device) -> None:
    """Wait for the training stream only (like loss.item()), not for a snapshot copy on a side stream."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def dcp_state(state) -> dict[str, torch.Tensor]:
    """The state for DCP: with several ranks each rank's experts get rank-specific keys (DCP would keep one
    copy of same-key tensors, as if replicated); the replicated tensors keep theirs, so DCP writes them once."""
    tensors, experts = state[0], state[1]
    if WORLD == 1:
        return tensors
    return {f"{k}.ep{RANK}" if k in experts else k: t for k, t in tensors.items()}


def _remove(path: Path) -> None:
    """Delete a checkpoint folder every rank has finished with (rank 0 deletes, after a barrier)."""
    _barrier()
    if RANK == 0:
        shutil.rmtree(path)
    _barrier()


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TorchSave:
    """The original method: a synchronous torch.save of everything (then fsync, for durability)."""

    per_rank_files = True  # bytes written: the sum over ranks (each writes its own file)

    def __call__(self, state, work: Path, step: int) -> tuple[float, float, int]:
        path = work / f"state-{step}-rank{RANK}.pt"
        t0 = time.perf_counter()
        torch.save(state[0], path)
        blocked = time.perf_counter() - t0
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        committed = time.perf_counter() - t0
        size = _du(path)
        path.unlink()
        return blocked, committed, size

    def start(self, state, work: Path, step: int, last: bool = False):
        """One save inside the loop (synchronous: it is done when this returns)."""
        return self(state, work, step)

    def wait_snapshot(self) -> float:
        """Nothing to wait for: the state was copied (or written) before `start` returned."""
        return 0.0

    def finish(self) -> None:
        """Nothing in flight."""

    close = finish


class DcpSave(TorchSave):
    """torch.distributed.checkpoint.save (synchronous; DCP fsyncs its files)."""

    per_rank_files = False

    def __call__(self, state, work: Path, step: int) -> tuple[float, float, int]:
        path = work / f"dcp-{step}"
        t0 = time.perf_counter()
        dcp.save(dcp_state(state), checkpoint_id=str(path))
        blocked = time.perf_counter() - t0
        size = _du(path)
        _remove(path)
        return blocked, blocked, size


class DcpAsyncSave:
    """torch.distributed.checkpoint.async_save, default options: stage on the CPU, write in a thread."""

    per_rank_files = False

    def __init__(self) -> None:
        self.pending: tuple[object, Path] | None = None

    def __call__(self, state, work: Path, step: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        self.start(state, work, step)
        blocked = time.perf_counter() - t0
        path = self.close()
        committed = time.perf_counter() - t0
        _barrier()  # every rank's part is written
        size = _du(path)
        _remove(path)
        return blocked, committed, size

    def start(self, state, work: Path, step: int, last: bool = False) -> None:
        """Begin a save; first finish (and delete) the previous one, as DCP asks."""
        previous = self.close()
        if previous is not None:
            _remove(previous)
        path = work / f"dcp-async-{step}"
        self.pending = (dcp.async_save(dcp_state(state), checkpoint_id=str(path)), path)

    def wait_snapshot(self) -> float:
        """Nothing to wait for: async_save stages the state on the CPU before it returns."""
        return 0.0

    def finish(self) -> None:
        """Wait for the save in flight and delete it."""
        path = self.close()
        if path is not None:
            _remove(path)

    def close(self) -> Path | None:
        """Wait for the save in flight; return its folder."""
        if self.pending is None:
            return None
        future, path = self.pending
        self.pending = None
        future.result() if hasattr(future, "result") else future.upload_completion.result()
        return path


class MoestackSave:
    """moestack two-level async checkpoints; one manager per folder, so its pinned buffers are reused."""

    per_rank_files = False  # rank 0's commit reports the whole checkpoint
    def __init__(self, pec_k: int, when_busy: str = "wait") -> None:
        self.pec_k, self.when_busy = pec_k, when_busy
        self.managers: dict[Path, CheckpointManager] = {}

    def manager(self, work: Path) -> CheckpointManager:
        """The manager writing under `work`."""
        if work not in self.managers:
            cfg = CheckpointConfig(keep=1, pec_k=self.pec_k, when_busy=self.when_busy)
            self.managers[work] = CheckpointManager(work, cfg, group=dist.group.WORLD if WORLD > 1 else None)
        return self.managers[work]

    @property
    def deferred(self) -> bool:
        """A checkpoint is owed (when_busy = defer): call `start` again at the next step."""
        return any(m.deferred is not None for m in self.managers.values())

    def __call__(self, state, work: Path, step: int) -> tuple[float, float, int]:
        handle = self.start(state, work, step)
        self.manager(work).wait_snapshot()  # no step to overlap the copy with: wait now, added to blocked_s
        self.manager(work).wait()
        return handle.blocked_s, handle.persist_s, handle.total_bytes

    def start(self, state, work: Path, step: int, last: bool = False):
        """Snapshot and return; the persist goes on in the background. `last`: the run's final checkpoint,
        full and never skipped or deferred, as the trainer takes it."""
        tensors, experts, tokens = state
        return self.manager(work).save(step, tensors, experts, {"step": step}, tokens, full=last)

    def wait_snapshot(self) -> float:
        """Wait for the snapshot copies in flight (CUDA); the seconds waited, added to their handles' blocked_s."""
        return sum(mgr.wait_snapshot() for mgr in self.managers.values())

    def finish(self) -> None:
        """Wait until the checkpoint in flight is committed."""
        for mgr in self.managers.values():
            mgr.wait()

    def close(self) -> None:
        """Finish what is in flight and free the buffers."""
        for mgr in self.managers.values():
            mgr.close()


# ---------------------------------------------------------------------------- driver


def measure(name: str, saver, state, work: Path, reps: int, device) -> dict:
    """One warm-up save, then `reps` measured ones: medians of blocked and committed times."""
    work.mkdir(parents=True, exist_ok=True)
    samples = []
    for rep in range(reps + 1):
        _sync(device)
        _barrier()  # all ranks start the save together
        blocked, committed, size = saver(state, work, rep + 1)
        size = _total(size or 0) if saver.per_rank_files else (size or 0)
        samples.append((_slowest(blocked), _slowest(committed), size))
        say(f"  {name} {'warm-up' if rep == 0 else f'rep {rep}'}: blocked {samples[-1][0]:.4f}s, "
            f"committed {samples[-1][1]:.3f}s")
    blocked, committed, size = zip(*samples[1:])
    return {"method": name, "blocked_s": statistics.median(blocked), "committed_s": statistics.median(committed),
            "bytes_written": int(statistics.median(size)), "blocked_all": list(blocked), "committed_all": list(committed)}


_LOOP_STEP0 = 1000
_MATMUL_N = {"cuda": 4096, "cpu": 256}


def calibrate(step_ms: float, device: torch.device) -> int:
    """Matmuls per synthetic step so that a step takes about `step_ms`."""
    a = torch.randn(_MATMUL_N[device.type], _MATMUL_N[device.type], device=device)
    for _ in range(3):
        a = torch.tanh(a @ a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a = torch.tanh(a @ a)
    _sync(device)
    return max(1, round(step_ms / 1000 / ((time.perf_counter() - t0) / 20)))


def throughput(name: str, saver, state, work: Path, steps: int, every: int, matmuls: int, device) -> dict:
    """Steps per second of a synthetic training loop (matmuls, then an in-place update of every state
    tensor, like an optimizer step) with a checkpoint every `every` steps (`saver` None: none).

    As in the trainer, the saver's snapshot copy may overlap the next step's compute and is waited for
    right before the update; each step ends waiting for the training stream only (like loss.item()).
    As in the trainer, the last step always takes a checkpoint (moestack: full, waiting for a write in
    flight), and the run ends once that checkpoint is written: the time includes it, for every method."""
    a = torch.randn(_MATMUL_N[device.type], _MATMUL_N[device.type], device=device)
    floats = [t for t in state[0].values() if t.is_floating_point() and t.device.type == device.type]
    work.mkdir(parents=True, exist_ok=True)
    _sync(device)
    _barrier()
    t0 = time.perf_counter()
    ends = []  # time at the end of each step: where the loss goes (the save steps, or the steps during persist)
    in_start, in_wait = [], []  # seconds inside saver.start at each save, inside wait_snapshot after each
    handles = []
    for step in range(1, steps + 1):
        for _ in range(matmuls):
            a = torch.tanh(a @ a)  # the step's compute
        if saver is not None:
            t_wait = time.perf_counter()
            if saver.wait_snapshot():  # the state changes in place next: the last snapshot must be complete
                in_wait.append(time.perf_counter() - t_wait)
        torch._foreach_mul_(floats, 1.0 - 1e-7)
        last = step == steps
        if saver is not None and (step % every == 0 or getattr(saver, "deferred", False) or last):
            t_start = time.perf_counter()
            # checkpoint steps after the measured saves' steps
            handles.append((step, saver.start(state, work, _LOOP_STEP0 + step, last=last)))
            in_start.append(time.perf_counter() - t_start)
        _sync_stream(device)
        ends.append(time.perf_counter())
    if saver is not None:
        saver.finish()  # the run is over once its last checkpoint is written
    _sync(device)
    elapsed = time.perf_counter() - t0
    durations = [b - a for a, b in zip([t0] + ends[:-1], ends)]
    save_steps = [durations[s - 1] for s in range(every, steps + 1, every)]
    after = [durations[s] for s in range(steps) if (s + 1) % every and (s + 1) > every and (s + 1) % every <= every // 2]
    out = {"method": name, "steps_per_s": steps / elapsed, "median_step_s": statistics.median(durations),
           "save_step_s": statistics.mean(save_steps) if save_steps else None,
           "after_save_median_s": statistics.median(after) if after else None,
           "start_s": statistics.mean(in_start) if in_start else None,
           "snapshot_wait_s": statistics.mean(in_wait) if in_wait else None,
           "taken_at": [s for s, h in handles if not getattr(h, "skipped", False)],  # other savers: every call
           "persist_s": [round(h.persist_s, 3) for _, h in handles if getattr(h, "persist_s", None) is not None],
           "copy_wait_s": [round(h.copy_wait_s, 3) for _, h in handles
                           if hasattr(h, "copy_wait_s") and not h.skipped]}
    say(f"  loop {name}: {steps / elapsed:.2f} steps/s; step median {out['median_step_s'] * 1e3:.1f} ms, "
          f"at a save {(out['save_step_s'] or 0) * 1e3:.1f} ms, first half of the intervals after a save "
          f"{(out['after_save_median_s'] or 0) * 1e3:.1f} ms (median); "
          f"inside save() {(out['start_s'] or 0) * 1e3:.1f} ms, "
          f"waiting for the snapshot copy {(out['snapshot_wait_s'] or 0) * 1e3:.1f} ms (means); persist s (save call "
          f"to commit) {out['persist_s']}, of which waiting for the copy {out['copy_wait_s']}; checkpoints taken at "
          f"steps {out['taken_at']}")
    return out


def main() -> None:
    """Run the selected methods, print the table, append JSON lines."""
    args = parse_args()
    if args.write_chunk_mb:
        storage.WRITE_CHUNK = args.write_chunk_mb << 20
    if args.writers:
        storage.WRITERS = args.writers
    if args.no_early_writeback:
        storage.EARLY_WRITEBACK = False
    say(f"moestack writer: {storage.WRITE_CHUNK >> 20} MiB per write/hash call, {storage.WRITERS} files at once, "
        f"files of {storage.FILE_BYTES >> 20} MiB, early writeback {storage.EARLY_WRITEBACK}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and WORLD > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # leave a core to the persist threads; see docs/methods/moc.md
    s = sizes(args, device)
    tensors, experts = build_state(s, device)
    tokens = torch.full((s["layers"], s["experts"]), 1000, dtype=torch.int64)
    state = (tensors, experts, tokens)
    # DCP async_save wants a process group with a CPU backend; gloo alone (an NCCL one hung at exit)
    if WORLD > 1:
        dist.init_process_group("gloo")  # torchrun's environment
        shared = [str(Path(tempfile.mkdtemp(prefix="moestack-bench-", dir=args.dir))) if RANK == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # --dir must be on a file system every rank sees
        root = Path(shared[0])
    else:
        root = Path(tempfile.mkdtemp(prefix="moestack-bench-", dir=args.dir))
        dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
    state_bytes = _total(sum(t.numel() * t.element_size() for t in tensors.values()))  # all ranks
    savers = {"torch_save": TorchSave, "dcp_save": DcpSave, "dcp_async_save": DcpAsyncSave,
              "moestack_full": lambda: MoestackSave(0, args.when_busy),
              "moestack_pec": lambda: MoestackSave(max(1, s["experts"] // 4), args.when_busy)}
    chosen = [m for m in args.methods.split(",") if m]
    say(f"{WORLD} rank(s), device {device_name(device)}; {s['params'] / 1e9:.3f}B parameters ({s['layers']} layers, "
        f"{s['experts']} experts, d {s['d']}, ffn {s['f']}); state {state_bytes / 2**30:.2f} GiB; writing to {root}")
    try:
        rows, warm = [], {}
        for m in chosen:
            warm[m] = savers[m]()
            rows.append(measure(m, warm[m], state, root / m, args.reps, device))
        loop = []
        if args.train_steps:  # the savers measured above, warm (moestack: pinned buffers allocated)
            matmuls = [calibrate(args.step_ms or (100 if device.type == "cuda" else 50), device)]
            if WORLD > 1:
                dist.broadcast_object_list(matmuls, src=0)  # the same synthetic step on every rank
            matmuls = matmuls[0]
            loop = [throughput("none", None, state, root / "none", args.train_steps, args.every, matmuls, device)]
            loop += [throughput(m, warm[m], state, root / m, args.train_steps, args.every, matmuls, device)
                     for m in chosen if m != "dcp_save"]
        for saver in warm.values():
            saver.close()
        _barrier()  # every rank is done with the folder
    finally:
        if RANK == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    if RANK == 0:
        report(rows, loop, s, state_bytes, device, args)


def device_name(device: torch.device) -> str:
    """GPU name, or 'CPU, N cores'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores"


def _vs(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{100 * (1 - ratio):.1f}% less" if ratio <= 1 else f"{ratio:.2f}x more"


def report(rows: list[dict], loop: list[dict], s: dict, state_bytes: int, device: torch.device, args) -> None:
    """Print the tables and append the JSON lines."""
    base = next((r for r in rows if r["method"] == "torch_save"), None)
    print(f"\n{'method':16} {'blocked/ckpt':>13} {'vs torch.save':>14} {'committed':>10} {'written':>11}")
    for r in rows:
        r["blocked_vs_torch_save"] = r["blocked_s"] / base["blocked_s"] if base else None
        ratio = _vs(r["blocked_vs_torch_save"])
        print(f"{r['method']:16} {r['blocked_s']:12.4f}s {ratio:>14} {r['committed_s']:9.3f}s "
              f"{r['bytes_written'] / 2**20:9.1f}MiB")
    if loop:
        none = loop[0]["steps_per_s"]
        print(f"\nthroughput, checkpoint every {args.every} of {args.train_steps} steps")
        for r in loop:
            r["throughput_loss"] = 1 - r["steps_per_s"] / none
            # the loop's extra wall time per checkpoint taken: what a checkpoint really blocks training
            extra = args.train_steps / r["steps_per_s"] - args.train_steps / none
            r["lost_s_per_checkpoint"] = extra / len(r["taken_at"]) if r.get("taken_at") else None
            lost = "-" if r["lost_s_per_checkpoint"] is None else f"{r['lost_s_per_checkpoint']:.3f} s"
            print(f"{r['method']:16} {r['steps_per_s']:8.2f} steps/s  {100 * r['throughput_loss']:6.2f}% loss  "
                  f"{lost} lost per checkpoint taken")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).with_name("results")
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"bench": "checkpoint", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(device), "torch": torch.__version__, "state_bytes": state_bytes,
              "reps": args.reps, "world_size": WORLD, **s,
              "writer": f"{storage.WRITE_CHUNK >> 20} MiB x {storage.WRITERS} writers, early writeback "
                        f"{'on' if storage.EARLY_WRITEBACK else 'off'}", "when_busy": args.when_busy}
    with open(out_dir / "checkpoint.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**common, **r}) + "\n")
        for r in loop:
            f.write(json.dumps({**common, "kind": "throughput", "every": args.every,
                                "train_steps": args.train_steps, **r}) + "\n")


if __name__ == "__main__":
    main()
