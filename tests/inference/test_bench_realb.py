"""bench/realb.py end to end at tiny sizes on the CPU: train, evaluate, trace, then time the traced ranks."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_realb_bench_runs_on_the_cpu(tmp_path):
    env = {"OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    traces = tmp_path / "traces.npz"
    common = [sys.executable, "bench/realb.py", "--models", "mixtral", "--ep", "4", "--traces", str(traces)]
    acc = subprocess.run(common + ["--study", "accuracy", "--train-steps", "3", "--eval-batches", "1",
                                   "--eval-tokens", "704", "--trace-tokens", "704", "--cache-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert acc.returncode == 0, acc.stderr[-2000:]
    assert "realb-fp8" in acc.stdout and "fp4-everywhere" in acc.stdout and traces.exists()
    rows = [json.loads(line) for line in (tmp_path / "realb_accuracy.jsonl").read_text().splitlines()]
    skew = {r["batch"]: r for r in rows if r["variant"] == "skew"}
    assert set(skew) == {"vision", "mixed", "text"} and all(r["max_mean"] >= 1 for r in skew.values())
    speed = subprocess.run(common + ["--study", "speed", "--scale", "64", "--reps", "1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=400)
    assert speed.returncode == 0, speed.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "realb_speed.jsonl").read_text().splitlines()]
    summary = [r for r in rows if r.get("summary")]
    assert {r["batch"] for r in summary} == {"vision/704", "mixed/704", "text/704"}
    assert all(r["gemm_bound_x"] > 0 and r["of_gemm_bound"] == r["realb_x"] / r["gemm_bound_x"] for r in summary)
    text = next(r for r in summary if r["batch"] == "text/704")
    assert text["realb_low"] == 0 and text["realb_x"] == 1.0  # text batches: ReaLB stays off
    # the policies re-evaluated on those measured times give the same table
    again = subprocess.run(common + ["--study", "from", "--from-results", str(tmp_path / "realb_speed.jsonl"),
                                     "--scale", "64"], cwd=ROOT, env={**env, "OUT": str(tmp_path / "again")},
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    rows2 = [json.loads(line) for line in (tmp_path / "again" / "realb_speed.jsonl").read_text().splitlines()]
    redo = {r["batch"]: r for r in rows2 if r.get("summary")}
    for r in summary:
        assert redo[r["batch"]]["realb_x"] == r["realb_x"] and redo[r["batch"]]["bf16_ms"] == r["bf16_ms"]


def test_the_layer_model_hides_the_second_conversion_under_the_first_gemm():
    sys.path.insert(0, str(ROOT / "bench"))
    from realb import low_rank_ms

    # whole conversion before the experts: 1.0 ms of FP8 experts + (0.5 - 0.1) ms not hidden by the dispatch
    assert low_rank_ms(fp8=1.0, conv=0.5, window=0.1) == 1.4
    # q13 (0.3 ms) first: the first half (0.6 ms) starts at 0.3, q2 is done by 0.5 < 0.9, the second half follows
    assert abs(low_rank_ms(fp8=1.0, conv=0.5, window=0.1, up=0.6, conv13=0.3) - 1.2) < 1e-12
    # q2 slower than the first GEMM: the second waits for it
    assert abs(low_rank_ms(fp8=1.0, conv=1.5, window=0.1, up=0.6, conv13=0.3) - 1.8) < 1e-12
    # a dispatch longer than the conversion hides it all
    assert low_rank_ms(fp8=1.0, conv=0.5, window=2.0, up=0.6, conv13=0.3) == 1.0
