"""End-to-end: the CLI trains, writes its run folder, resumes exactly, and runs expert parallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moestack.cli import main

TINY = ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_layers", "2", "--model.seq_len", "32",
        "--moe.num_experts", "4", "--moe.d_ff", "32", "--batch-size", "4", "--train.eval_batches", "2",
        "--train.log_every", "1", "--train.eval_every", "10", "--device", "cpu"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOESTACK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_cli_train_writes_the_run_folder(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "20", "--run-dir", str(run), "--ckpt-every", "10"]) == 0
    assert {"config.toml", "metrics.jsonl", "loss.png", "ckpt"} <= {p.name for p in run.iterdir()}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]
    assert rows[-1]["step"] == 20 and "val_loss" in rows[-1] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert all("load_max_over_mean" in r for r in rows if "loss" in r)
    assert (run / "loss.png").stat().st_size > 1000
    assert main(["ckpt", "verify", str(run)]) == 0
    assert main(["eval", "--run-dir", str(run), "--batches", "2", "--device", "cpu"]) == 0
    assert main(["generate", "--run-dir", str(run), "--max-new-tokens", "5", "--device", "cpu"]) == 0


def test_resume_continues_with_the_same_losses(tmp_path):
    full = tmp_path / "full"
    assert main(["train", *TINY, "--steps", "20", "--run-dir", str(full), "--ckpt-every", "10"]) == 0
    # a run interrupted after step 10: its folder holds the step-10 checkpoint only
    cut = tmp_path / "cut"
    (cut / "ckpt").mkdir(parents=True)
    shutil.copy(full / "config.toml", cut / "config.toml")
    shutil.copytree(full / "ckpt" / "step-00000010", cut / "ckpt" / "step-00000010")
    (cut / "ckpt" / "latest").write_text("step-00000010\n")
    assert main(["train", *TINY, "--steps", "20", "--run-dir", str(cut), "--ckpt-every", "10", "--resume"]) == 0
    want, got = losses(full), losses(cut)
    assert sorted(got) == list(range(11, 21))
    # a run interrupted at step 15 whose last checkpoint is step 10: resuming logs 11..15 again, once
    again = tmp_path / "again"
    shutil.copytree(cut, again)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    (again / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 15))
    shutil.rmtree(again / "ckpt" / "step-00000020")
    (again / "ckpt" / "latest").write_text("step-00000010\n")
    assert main(["train", *TINY, "--steps", "20", "--run-dir", str(again), "--ckpt-every", "10", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--moe.top_k", "9"], "moe.top_k=9 exceeds"),
        (["train", "--data", "/no/such/path"], "no such file or folder"),
        (["train", "--model.nope", "1"], "unrecognized arguments"),
        (["eval", "--run-dir", "/no/such/run"], "not a moestack run folder"),
        (["train", "--placement", "/no/such/placement.json"], "/no/such/placement.json"),
        (["train", "--moe.capacity_factor", "1.5", "--ep", "2"], "moe.capacity_factor > 0 is not supported"),
        (["train", "--model.vocab_size", "100"], "model.vocab_size=100 is below 256"),
        (["train", "--train.lr", "nan"], "train.lr must be a finite number, got nan"),
        (["train", "--moe.aux_loss_coef", "nan"], "moe.aux_loss_coef must be a finite number"),
        (["train", "--model.rope_theta", "0"], "model.rope_theta must be > 0"),
        (["train", "--resume"], "is not a moestack run folder (no config.toml)"),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_no_run_folder(argv, needle, capsys, tmp_path):
    run = tmp_path / "run"
    if argv[0] == "train":
        argv = [*argv, "--run-dir", str(run), "--device", "cpu"]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not run.exists()


def test_resume_with_a_different_model_is_refused_and_keeps_the_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--run-dir", str(run), "--ckpt-every", "2"]) == 0
    before = (run / "config.toml").read_text()
    assert main(["train", *TINY, "--model.d_model", "64", "--steps", "6", "--run-dir", str(run), "--resume"]) == 2
    assert "model.d_model=64 but the run" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == before


def test_resume_when_every_checkpoint_is_damaged_is_an_error_not_a_fresh_start(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--run-dir", str(run), "--ckpt-every", "2"]) == 0
    for shard in (run / "ckpt").glob("step-*/rank-*.safetensors"):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    assert main(["train", *TINY, "--steps", "6", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no intact checkpoint" in err and "sha256 mismatch" in err and "ckpt verify" in err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before  # nothing moved aside or deleted


def test_resume_continues_the_run_as_configured_and_a_used_folder_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--train.lr", "1e-3", "--run-dir", str(run), "--ckpt-every", "2"]) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--steps", "6"]) == 0  # no model flags repeated
    saved = (run / "config.toml").read_text()
    assert "lr = 0.001" in saved and "steps = 6" in saved and "d_model = 32" in saved
    assert sorted(losses(run)) == list(range(1, 7))
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "2", "--run-dir", str(run)]) == 2  # a new run into a used folder
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == saved and sorted(losses(run)) == list(range(1, 7))
    assert main(["train", "--run-dir", str(tmp_path / "typo"), "--resume"]) == 2
    assert "is not a moestack run folder" in capsys.readouterr().err and not (tmp_path / "typo").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ranks, extra", [(2, []), (4, ["--dp", "2"])], ids=["ep2", "ep2-dp2"])
def test_torchrun_ep2_matches_single_process_losses(tmp_path, ranks, extra):
    """20 steps under torchrun with 4 experts, expert parallel by default (ep 2 on 2 ranks; ep 2 x dp 2 with
    --dp 2 on 4), on gloo give the single-process losses (global batch, global aux), here with a
    non-contiguous placement file as `moestack plan` writes it."""
    single, ep2 = tmp_path / "single", tmp_path / "ep2"
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"format": "moestack.placement/v1", "num_gpus": 2,
                                     "expert_to_gpu": [[1, 0, 0, 1], [0, 1, 1, 0]]}))
    common = [*TINY, "--steps", "20", "--train.eval_every", "0", "--moe.num_experts", "4"]
    assert main(["train", *common, "--run-dir", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "moestack.cli", "train", *common, *extra, "--run-dir", str(ep2), "--placement", str(placement)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{ranks} ranks: expert parallel over 2, data parallel over {ranks // 2}" in proc.stderr
    want, got = losses(single), losses(ep2)
    assert sorted(got) == list(range(1, 21))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=5e-6), step
    # the run's 2-rank placement does not tie it to 2 ranks: one process evaluates and traces it
    assert main(["eval", "--run-dir", str(ep2), "--batches", "1", "--device", "cpu"]) == 0
    assert main(["trace", "--run-dir", str(ep2), "--tokens", "256", "--out", str(tmp_path / "t.npz"),
                 "--device", "cpu"]) == 0


def test_capacity_factor_logs_dropped_token_choices(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--run-dir", str(run), "--ckpt-every", "0",
                 "--moe.capacity_factor", "0.5"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # capacity 0.5 x the mean load: at least half of each layer's token-choices cannot fit
    tokens_x_k = 4 * 32 * 2
    assert all(len(r["dropped"]) == 2 and min(r["dropped"]) >= tokens_x_k // 2 for r in rows)


def test_a_deferred_checkpoint_is_taken_at_a_later_step(tmp_path, monkeypatch):
    import threading

    import moestack.checkpoint.persist as persist
    from moestack.checkpoint.storage import list_committed

    real, calls = persist.write_shards, []
    first_done = threading.Event()

    def write(directory, rank, tensors):  # the first checkpoint's write lasts until the trainer has moved on
        calls.append(directory)
        if len(calls) == 1:
            first_done.wait(20)
        return real(directory, rank, tensors)

    monkeypatch.setattr(persist, "write_shards", write)
    from moestack.checkpoint import manager as mgr_mod

    save = mgr_mod.CheckpointManager.save

    def save_and_release(self, step, *args, **kwargs):  # once a save at step >= 7 was deferred, let it finish
        handle = save(self, step, *args, **kwargs)
        if handle.skipped and step >= 7:
            first_done.set()
            self._thread.join()  # so that the next step's save finds the write done
        return handle

    monkeypatch.setattr(mgr_mod.CheckpointManager, "save", save_and_release)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "12", "--run-dir", str(run), "--ckpt-every", "5",
                 "--checkpoint.when_busy", "defer", "--checkpoint.keep", "5"]) == 0
    steps = [s for s, _ in list_committed(run / "ckpt")]
    assert steps == [5, 11, 12]  # step 10's checkpoint was owed, then taken at the first step after the write


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tmp_path):
    """--train.compile true traces the whole model (router, dispatcher, grouped experts) with torch.compile."""
    common = [*TINY, "--steps", "2", "--train.eval_every", "0", "--ckpt-every", "0"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "eager")]) == 0
    assert main(["train", *common, "--train.compile", "true", "--run-dir", str(tmp_path / "compiled")]) == 0
    want, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step


def test_ctrl_c_stops_at_a_step_with_a_full_checkpoint_and_resume_continues(tmp_path):
    import signal
    import time

    from moestack.checkpoint.storage import list_committed

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moestack.cli", "train", *TINY, "--steps", "100000", "--train.eval_every", "0",
           "--ckpt-every", "100000", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run) if (run / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "continue with: moestack train --run-dir" in err
    steps = [s for s, _ in list_committed(run / "ckpt")]
    assert len(steps) == 1 and steps[0] >= 3  # the checkpoint taken at the step where it stopped
    assert main(["train", "--run-dir", str(run), "--resume", "--steps", str(steps[0] + 2)]) == 0
    assert max(losses(run)) == steps[0] + 2


def test_resume_of_a_run_already_at_its_steps_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--train.eval_every", "0", "--run-dir", str(run)]) == 0
    saved = (run / "config.toml").read_text()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--steps", "3"]) == 2
    assert "already at step 4; --steps is the total number of steps" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == saved


def test_eval_defaults_to_the_validation_training_logged(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--train.eval_every", "0", "--run-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"val_loss {logged:.4f}" in out and "(2 batches)" in out
    with pytest.raises(SystemExit):  # argparse refuses it before anything loads
        main(["generate", "--run-dir", str(run), "--temperature", "-1"])
    assert "must be a finite number >= 0, got -1" in capsys.readouterr().err


def test_a_mistyped_flag_gets_the_commands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--stepz", "10"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: moestack train" in err and "unrecognized arguments: --stepz 10 (did you mean --steps?)" in err
