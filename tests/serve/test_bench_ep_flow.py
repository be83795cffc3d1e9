"""bench/ep_flow.py end to end at tiny sizes: 2 gloo ranks, home and follow, contiguous and ILP placements."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ep_flow_bench_runs_on_the_cpu(tmp_path):
    env = {"OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "bench/ep_flow.py", "--hf-tiny", "--gpus", "2", "--prompts", "3",
                           "--prompt-len", "8", "--max-tokens", "3", "--time-limit", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "ep_flow.jsonl").read_text().splitlines()]
    assert {(r["placement"], r["flow"]) for r in rows} == {(p, f) for p in ("contiguous", "ilp") for f in ("home", "follow")}
    for r in rows:
        assert r["moe_rows_per_token_layer"] > 0 and r["ms_per_1k_tok_nvlink_280"] > 0
        # only the follow flow replicates keys and values (one token's K and V to the one other rank)
        assert (r["kv_row_equiv"] > 0) == (r["flow"] == "follow")
