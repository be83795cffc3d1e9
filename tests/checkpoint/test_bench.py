"""bench/checkpoint.py runs on one process and under torchrun (2 gloo ranks, each with half the experts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["bench/checkpoint.py", "--params", "3e6", "--d-model", "64", "--ffn", "128", "--vocab", "512",
        "--reps", "1", "--methods", "torch_save,dcp_save,moestack_full,moestack_pec"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_checkpoint_bench_writes_one_row_per_method(tmp_path, ranks):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(ranks)]
    done = subprocess.run([*launch, *ARGS, "--dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "checkpoint.jsonl").read_text().splitlines())}
    assert set(rows) == {"torch_save", "dcp_save", "moestack_full", "moestack_pec"}
    assert all(r["world_size"] == ranks and r["blocked_s"] > 0 for r in rows.values())
    full, pec = rows["moestack_full"]["bytes_written"], rows["moestack_pec"]["bytes_written"]
    assert 0 < pec < full  # PEC holds a quarter of the experts
    if ranks == 2:  # torch.save writes the replicated state once per rank; moestack shards it: once in total
        assert rows["torch_save"]["bytes_written"] > full
    assert not list(tmp_path.glob("moestack-bench-*"))  # the bench removes its checkpoints


def test_the_throughput_loop_takes_the_last_checkpoint_and_times_its_write(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [*ARGS[:-1], "torch_save,moestack_pec", "--train-steps", "7", "--every", "3", "--step-ms", "5",
            "--when-busy", "defer", "--dir", str(tmp_path)]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    loop = [r for r in map(json.loads, (tmp_path / "checkpoint.jsonl").read_text().splitlines())
            if r.get("kind") == "throughput"]
    taken = {r["method"]: r["taken_at"] for r in loop if r["method"] != "none"}
    assert taken["moestack_pec"][-1] == 7 and taken["torch_save"] == [3, 6, 7]  # the last step always saves
