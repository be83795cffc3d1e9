"""SIGKILL a checkpointing process at random moments: the newest committed checkpoint always survives."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from moestack.checkpoint import verify
from moestack.checkpoint.recovery import plan_recovery, read_state
from moestack.checkpoint.storage import list_committed, read_latest

from tests.checkpoint.crash_worker import STATE
from tests.checkpoint.helpers import check_experts

KILLS = 15


def _check_after_kill(root: Path) -> int:
    """Everything committed verifies, `latest` names an existing checkpoint, the newest one loads."""
    committed = list_committed(root)
    for _, path in committed:
        assert verify(path) == [], path
    latest = read_latest(root)
    if (root / "latest").exists():
        assert latest is not None and (root / latest).is_dir(), f"latest -> {latest} is missing"
    if not committed:
        return 0
    plan = plan_recovery(root)
    assert Path(plan["target"]) == committed[-1][1] and plan["skipped"] == []
    tensors, meta, report, _ = read_state(root, plan, None)
    assert torch.equal(tensors["model.embed.weight"], torch.full(STATE["dense"], float(meta["step"])))
    check_experts(tensors, report.expert_sources)
    return report.step


def test_sigkill_never_loses_the_last_committed_checkpoint(tmp_path):
    rng = random.Random(1234)
    zygote = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("crash_worker.py")), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "worker.log", "w"), text=True,
    )
    root = tmp_path / "ckpt"
    steps, mid_persist = [], 0
    try:
        for trial in range(KILLS):
            zygote.stdin.write(f"go {trial}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.8))
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "reaped"
            mid_persist += any(p.name.startswith(".tmp-") for p in root.iterdir()) if root.exists() else 0
            steps.append(_check_after_kill(root))
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    print(f"steps after each kill: {steps}; kills during a persist: {mid_persist}/{KILLS}")
    assert steps == sorted(steps) and steps[-1] > KILLS, steps  # training progresses across restarts
    assert mid_persist >= 3, f"only {mid_persist} of {KILLS} kills landed during a persist"
