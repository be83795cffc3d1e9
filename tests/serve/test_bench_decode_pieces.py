"""bench/decode_pieces.py end to end at toy sizes on the CPU, its Triton pieces under the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_decode_pieces_bench_times_every_piece(tmp_path):
    pytest.importorskip("triton", reason="the Triton pieces run under Triton's interpreter")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "bench/decode_pieces.py", "--shapes", "tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "decode_pieces.jsonl").read_text().splitlines()]
    got = {(r["piece"], r["variant"]) for r in rows}
    assert {("lm_head", "cublas"), ("lm_head", "moe_gemm"), ("experts_w13", "moe_gemm"), ("experts", "fused_experts"),
            ("paged_decode_32", "block_n128"), ("argmax", "torch"), ("argmax", "triton_model_dtype"),
            ("experts_w13", "moe_gemm_swiglu"), ("route_and_plan", "cublas_topk_plan")} <= got
    assert all(r["us"] > 0 and r["mbytes"] > 0 for r in rows)
