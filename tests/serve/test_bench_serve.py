"""bench/serve.py's DualSparse rows end to end on the CPU (tiny shapes): the engines the GPU call compares."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_compares_both_drop_policies_with_no_dropping(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--no-hf", "--mixed", "0", "--batches", "",
                           "--drop-rates", "0.25", "--drop-batches", "4", "--drop-reps", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "serve.jsonl").read_text().splitlines()]
    drops = [r for r in rows if r["bench"] == "dualsparse"]
    assert [(r["drop_rate"], r["drop_policy"]) for r in drops] == [(None, "-"), (0.25, "auto"), (0.25, "token")]
    assert "achieved_drop" not in drops[0] and all(r["achieved_drop"] == pytest.approx(0.25, abs=0.08)
                                                   for r in drops[1:])
    assert all(r["total_x_nodrop"] > 0 and r["decode_tok_s"] > 0 for r in drops[1:])
