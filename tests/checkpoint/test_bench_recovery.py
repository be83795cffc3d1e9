"""bench/moc_recovery.py (the MoC recovery-quality table) runs end to end on a tiny schedule."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recovery_bench_runs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "bench/moc_recovery.py", "--steps", "4", "--fail-at", "3", "--every", "2",
                           "--set", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32",
                           "moe.num_experts=4", "moe.d_ff=32", "train.eval_batches=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for run in ("never failed (baseline)", "failed, full checkpoints", "failed, PEC sequential", "failed, PEC load_aware"):
        assert run in done.stdout
    assert (tmp_path / "moc_recovery.jsonl").exists()
