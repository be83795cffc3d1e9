"""bench/placement.py runs end to end on a tiny setting and appends one JSON line per method."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from moestack.placement import RoutingTrace

BENCH = Path(__file__).resolve().parents[2] / "bench" / "placement.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_placement", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_prints_table_and_appends_results(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "placement.jsonl"
    argv = ["--models", "olmoe", "--gpus", "4", "--tokens", "256", "--time-limit", "1", "--ilp", "1", "1@1.05",
            "--out", str(out)]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["ilp w=1", "ilp w=1 cap=1.05", "greedy", "round_robin", "contiguous", "random"]
    assert all(r["gpus"] == 4 and r["experts"] == 64 and "speedup_slow" in r for r in rows)
    assert next(r for r in rows if r["method"] == "contiguous")["speedup_nvlink"] == 1.0
    assert "ilp w=1 cap=1.05" in capsys.readouterr().out


def test_load_bound_counts_the_experts_sharing_the_heaviest_gpu():
    bench = load_bench()
    trace = RoutingTrace(np.array([[8, 1, 1, 2]]), np.zeros((0, 4, 4), np.int64), 1)
    # 2 gpus, 2 experts each: the gpu with the 8 holds at least a 1 -> 9 / mean 6
    assert bench.load_bound(trace, 2) == 9 / 6
    assert bench.load_bound(trace, 4) == 8 / 3
