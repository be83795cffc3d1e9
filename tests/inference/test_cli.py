"""`moestack sparsify` and `eval --drop-rate` on a tiny trained run: files, report, reload, errors."""

import argparse
import json

import pytest
import torch

from moestack.cli import main
from moestack.config import load_config
from moestack.inference.cli import (
    add_drop_eval_args,
    add_sparsify_parser,
    evaluate_with_drop,
    run_eval_with_drop,
    run_sparsify,
)
from moestack.inference.dualsparse import drop_stats, reset_drop_stats
from moestack.inference.export import load_sparse, read_spec
from moestack.parallel.mesh import ParallelContext
from moestack.runs import evaluate, evaluate_run

TINY = {"model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2, "model.seq_len": 32, "moe.num_experts": 4,
        "moe.d_ff": 32, "train.batch_size": 4, "train.eval_batches": 1, "train.eval_every": 0, "train.log_every": 1,
        "train.device": "cpu", "train.steps": 3, "checkpoint.every": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moestack.train import train

    base = tmp_path_factory.mktemp("sparsify")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESTACK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(load_config(overrides={**TINY, "train.run_dir": str(base / "run")}))
        yield base / "run"


def parse(argv):
    parser = argparse.ArgumentParser(prog="moestack")
    sub = parser.add_subparsers(dest="command")
    add_sparsify_parser(sub)
    ev = sub.add_parser("eval")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--batches", type=int, default=16)
    ev.add_argument("--device", default="auto")
    add_drop_eval_args(ev)
    return parser.parse_args(argv)


def test_sparsify_writes_a_model_that_reloads_with_the_reported_loss(run, tmp_path, capsys):
    out = tmp_path / "sparse"
    args = parse(["sparsify", "--run-dir", str(run), "--drop-rate", "0.25", "--calib-batches", "2", "--batches", "2",
                  "--device", "cpu", "--out", str(out)])
    assert run_sparsify(args) == 0
    assert "drop rate" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.toml", "model.safetensors", "sparse.json", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_drop_rate"] == pytest.approx(0.25, abs=0.08)
    assert report["val_loss_before"] > 0 and report["val_loss_after"] > 0
    assert read_spec(out)["parts"] == 2 and not list(out.glob("*.pt"))

    model, spec = load_sparse(out)
    reset_drop_stats(model)
    cfg = load_config(out / "config.toml")
    again = evaluate(model, cfg, ParallelContext(device=torch.device("cpu")), 2)
    assert again["val_loss"] == pytest.approx(report["val_loss_after"], abs=1e-5)
    assert drop_stats(model)["drop_rate"] == pytest.approx(report["achieved_drop_rate"], abs=1e-9)


def test_evaluate_with_drop_zero_is_the_plain_evaluation(run):
    plain = evaluate_run(run, 2, "cpu")
    result = evaluate_with_drop(run, 0.0, 2, "cpu")
    assert result["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6) and result["drop_rate"] == 0.0
    naive = evaluate_with_drop(run, 0.25, 2, "cpu", method="naive", calib_batches=2)
    assert naive["drop_rate"] == pytest.approx(0.25, abs=0.08) and naive["perplexity"] > 1


def test_eval_with_drop_rate_prints_loss_and_rate(run, capsys):
    args = parse(["eval", "--run-dir", str(run), "--batches", "2", "--device", "cpu", "--drop-rate", "0.1",
                  "--calib-batches", "2", "--method", "partition"])
    assert run_eval_with_drop(args) == 0
    assert "val_loss" in (line := capsys.readouterr().out) and "drop_rate" in line


@pytest.mark.parametrize("flags, needle", [
    (["--drop-rate", "1.5"], r"--drop-rate must be in [0, 1)"),
    (["--parts", "5"], "parts=5 must be >= 1 and divide"),
])
def test_bad_flags_exit_2_with_one_line(run, tmp_path, capsys, flags, needle):
    args = parse(["sparsify", "--run-dir", str(run), "--device", "cpu", "--calib-batches", "1", "--batches", "1",
                  "--out", str(tmp_path / "o"), *flags])
    assert run_sparsify(args) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["sparsify", "--batches", "0"], "argument --batches: expected an integer >= 1, got 0"),
    (["eval", "--batches", "-1"], "argument --batches: expected an integer >= 1, got -1"),
    (["eval", "--calib-batches", "0", "--drop-rate", "0.2"], "argument --calib-batches: expected an integer >= 1"),
    (["eval", "--method", "naive", "--parts", "4"], "--parts, --method only apply with --drop-rate R"),
])
def test_cli_flags_out_of_range_or_without_effect_are_refused(run, capsys, argv, needle):
    try:
        code = main([*argv, "--run-dir", str(run), "--device", "cpu"])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2 and needle in capsys.readouterr().err
