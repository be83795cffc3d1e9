"""Shared benchmark helpers: timing with warm-up and medians, result lines."""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn() over reps, after warm-up, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_gpu(fn, device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn() on the device's current stream, between two CUDA events (fn makes that stream
    wait for any side-stream work it starts): GPU time only, without the host's launch and sync latency that
    `time_fn` counts. Off CUDA: `time_fn`."""
    if torch.device(device).type != "cuda":
        return time_fn(fn, device, warmup, reps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize(device)
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def write_results(name: str, rows: list[dict]) -> Path:
    """Append rows as JSON lines to $OUT/<name>.jsonl (device runs) or bench/results/<name>.jsonl."""
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    stamp = {"date": date.today().isoformat(), "torch": torch.__version__}
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)
