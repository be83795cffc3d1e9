import argparse

import pytest
import torch

from moestack.checkpoint import CheckpointConfig, CheckpointManager
from moestack.checkpoint.cli import add_ckpt_parser

from tests.checkpoint.helpers import NUM_EXPERTS, make_state


def _run(capsys, *argv):
    parser = argparse.ArgumentParser(prog="moestack")
    add_ckpt_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.fixture
def run_dir(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(pec_k=2, keep=10))
    for step in (10, 20, 30):
        tensors, experts = make_state(step)
        mgr.save(step, tensors, experts, {"step": step}, torch.ones(2, NUM_EXPERTS, dtype=torch.int64))
    mgr.close()
    return tmp_path


def test_ls_shows_steps_experts_plt_status(run_dir, capsys):
    code, out = _run(capsys, "ckpt", "ls", str(run_dir))
    lines = out.splitlines()
    assert code == 0 and lines[1].split() == ["step", "size", "experts", "PLT", "status"]
    assert lines[2].split()[0] == "10" and "8/8" in lines[2] and "0.00%" in lines[2]
    assert "2/8" in lines[4] and "ok" in lines[4] and "<- latest" in lines[4]


def test_verify_ok_then_names_the_bad_file(run_dir, capsys):
    code, out = _run(capsys, "ckpt", "verify", str(run_dir))
    assert code == 0 and "newest checkpoint step-00000030: intact" in out
    shard = run_dir / "ckpt" / "step-00000030" / "rank-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    older = run_dir / "ckpt" / "step-00000010" / "manifest.json"
    older.write_text(older.read_text()[:10])
    code, out = _run(capsys, "ckpt", "verify", str(run_dir))
    assert code == 1 and str(shard) in out and str(older) in out and "NOT intact" in out
    code, out = _run(capsys, "ckpt", "ls", str(run_dir))
    assert "BAD" in out and str(shard) in out


def test_verify_fails_when_a_needed_older_copy_is_bad(run_dir, capsys):
    # step 30 holds experts 2, 3; 4-7 only live in the full checkpoint at step 10
    (run_dir / "ckpt" / "step-00000010" / "rank-00000.safetensors").unlink()
    code, out = _run(capsys, "ckpt", "verify", str(run_dir))
    assert code == 1 and "has no intact copy" in out


def test_empty_run_dir(tmp_path, capsys):
    assert _run(capsys, "ckpt", "verify", str(tmp_path))[0] == 1
    assert _run(capsys, "ckpt", "ls", str(tmp_path))[0] == 1
