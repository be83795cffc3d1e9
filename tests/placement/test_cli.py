"""`moestack plan` as moestack.cli wires it: a parser, a run function, exit codes."""

import argparse
import json

import numpy as np

from moestack.placement import Placement, RoutingTrace
from moestack.placement.cli import add_plan_parser, run_plan
from moestack.placement.synthetic import synthetic_trace


def parse(argv):
    parser = argparse.ArgumentParser(prog="moestack")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_plan_writes_placement_and_prints_every_method(tmp_path, capsys):
    trace_path, out = tmp_path / "trace.npz", tmp_path / "placement.json"
    synthetic_trace(4, 8, 2, num_tokens=256).save(trace_path)
    args = parse(["plan", "--trace", str(trace_path), "--gpus", "2", "--out", str(out), "--time-limit", "5"])
    assert args.func is run_plan
    assert run_plan(args) == 0
    placement = Placement.load(out)
    placement.validate(num_layers=4, num_experts=8, num_gpus=2)
    assert json.loads(out.read_text())["format"] == "moestack.placement/v1"
    printed = capsys.readouterr().out
    for word in ("ilp *", "greedy", "round_robin", "contiguous", "random", "cross-gpu", "max/mean worst", "solve s",
                 "moestack EP ms"):
        assert word in printed


def test_plan_with_a_baseline_method(tmp_path, capsys):
    trace_path, out = tmp_path / "trace.npz", tmp_path / "p.json"
    synthetic_trace(3, 8, 2, num_tokens=128).save(trace_path)
    assert run_plan(parse(["plan", "--trace", str(trace_path), "--gpus", "4", "--out", str(out), "--method", "round_robin"])) == 0
    assert Placement.load(out).expert_to_gpu[0] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert "round_robin *" in capsys.readouterr().out


def test_plan_errors_print_one_line_and_return_2(tmp_path, capsys):
    good = tmp_path / "good.npz"
    synthetic_trace(2, 8, 2, num_tokens=64).save(good)
    bad = tmp_path / "bad.npz"
    np.savez(bad, counts=np.ones((2, 8), np.int64), transitions=np.ones((1, 8, 8), np.int64), top_k=2)
    empty = tmp_path / "empty.npz"
    np.savez(empty, counts=np.zeros((2, 8), np.int64), transitions=np.zeros((1, 8, 8), np.int64), top_k=2)
    cases = [
        (["--trace", str(good), "--gpus", "3"], "E=8 experts cannot be split evenly over G=3 gpus"),
        (["--trace", str(bad), "--gpus", "2"], "counts and transitions disagree"),
        (["--trace", str(tmp_path / "none.npz"), "--gpus", "2"], "file not found"),
        (["--trace", str(good), "--gpus", "2", "--time-limit", "0"], "--time-limit must be positive"),
        (["--trace", str(good), "--gpus", "2", "--comm-weight", "nan"], "--comm-weight must be a finite number"),
        (["--trace", str(good), "--gpus", "2", "--max-imbalance", "nan"], "--max-imbalance must be a finite number"),
        (["--trace", str(good), "--gpus", "2", "--time-limit", "inf"], "--time-limit must be a finite number"),
        (["--trace", str(empty), "--gpus", "2"], "the trace holds no tokens"),
    ]
    for argv, needle in cases:
        out = tmp_path / "p.json"
        assert run_plan(parse(["plan", *argv, "--out", str(out)])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moestack plan: error: ") and needle in err[0], err
        assert not out.exists()
    assert RoutingTrace.load(good).num_experts == 8


def test_plan_out_folder_is_refused_before_solving(tmp_path, capsys, monkeypatch):
    import moestack.placement.cli as cli

    trace_path = tmp_path / "trace.npz"
    synthetic_trace(2, 8, 2, num_tokens=64).save(trace_path)
    monkeypatch.setattr(cli, "solve", lambda *a, **k: (_ for _ in ()).throw(AssertionError("solved")))
    assert run_plan(parse(["plan", "--trace", str(trace_path), "--gpus", "2", "--out", str(tmp_path)])) == 2
    assert "is a folder; pass the path of the placement JSON file" in capsys.readouterr().err


def test_a_placement_of_numpy_integers_saves_as_json(tmp_path):
    placement = Placement(np.int64(2), [[np.int64(g) for g in (0, 1, 1, 0)]])
    placement.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["expert_to_gpu"] == [[0, 1, 1, 0]]


def test_plan_says_when_a_baseline_is_faster_under_moestacks_ep(tmp_path, capsys):
    """round_robin on a skewed trace: greedy balances better, which is all moestack's EP sees."""
    trace_path, out = tmp_path / "trace.npz", tmp_path / "p.json"
    synthetic_trace(4, 8, 2, num_tokens=512, seed=3).save(trace_path)
    assert run_plan(parse(["plan", "--trace", str(trace_path), "--gpus", "2", "--out", str(out), "--method", "round_robin"])) == 0
    printed = capsys.readouterr().out
    assert "note: under moestack's EP (tokens return home every layer)" in printed and "--comm-weight 0" in printed
