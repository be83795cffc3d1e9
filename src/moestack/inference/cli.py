"""`moestack sparsify` and `moestack eval --drop-rate`: DualSparse on a trained run.

The main CLI wires these in (moestack.cli): `add_sparsify_parser(sub)` adds the `sparsify` command run
by `run_sparsify(args)`; `add_drop_eval_args(eval_parser)` adds --drop-rate/--parts/--calib-batches/--method
to `eval`, whose handler calls `run_eval_with_drop(args)` when --drop-rate is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

from moestack.inference.dualsparse import drop_stats, naive_drop, reset_drop_stats, sparsify
from moestack.inference.export import save_sparse

METHODS = ("dualsparse", "partition", "naive")  # partition = DualSparse without neuron reconstruction


def add_sparsify_parser(subparsers) -> argparse.ArgumentParser:
    """Add `sparsify` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "sparsify", help="DualSparse a trained run: partition experts, reorder neurons, drop minor computation",
        description="Split each expert into sub-experts, reorder neurons by calibrated importance and skip the "
                    "sub-expert computations with the smallest estimated contribution at --drop-rate. Writes the "
                    "transformed model (safetensors + JSON) and a report with the val loss before and after.")
    p.add_argument("--run-dir", required=True, help="a run folder written by `moestack train`")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/sparse)")
    add_drop_eval_args(p, default_rate=0.25)
    p.add_argument("--batches", type=positive_int, default=None,
                   help="validation batches for the before/after loss (default: the run's train.eval_batches)")
    p.add_argument("--device", default="auto")
    return p


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# what `eval` uses when --drop-rate is given; without it these options would be ignored, so they are refused
DROP_DEFAULTS = {"parts": 2, "calib_batches": 8, "method": "dualsparse"}


def add_drop_eval_args(p: argparse.ArgumentParser, default_rate: float | None = None) -> None:
    """The DualSparse options shared by `sparsify` and `eval`."""
    p.add_argument("--drop-rate", type=float, default=default_rate,
                   help="fraction of sub-expert computations to skip, in [0, 1)")
    p.add_argument("--parts", type=positive_int, default=None, help="sub-experts per expert (must divide moe.d_ff; "
                   "default 2)")
    p.add_argument("--calib-batches", type=positive_int, default=None,
                   help="training batches used for calibration (default 8)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="dualsparse (default) | partition (no neuron reconstruction) | naive (drop whole low-weight "
                        "choices)")


def run_sparsify(args) -> int:
    """`moestack sparsify`: transform, evaluate before/after, write model and report; exit status."""
    try:
        _check_args(args)
        report = sparsify_run(args.run_dir, args.drop_rate, args.out, parts=args.parts,
                              calib_batches=args.calib_batches, method=args.method, batches=args.batches,
                              device=args.device)
    except ValueError as err:
        print(f"moestack sparsify: error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(f"val_loss {report['val_loss_before']:.4f} -> {report['val_loss_after']:.4f} "
              f"({100 * report['val_loss_increase']:+.2f}%)  drop rate {report['achieved_drop_rate']:.3f} "
              f"(target {report['drop_rate']:.3f})  -> {report['out']}")
    return 0


def run_eval_with_drop(args) -> int:
    """`moestack eval --drop-rate R`: print val loss, perplexity and the achieved drop rate; exit status."""
    try:
        _check_args(args)
        r = evaluate_with_drop(args.run_dir, args.drop_rate, args.batches, args.device, parts=args.parts,
                               calib_batches=args.calib_batches, method=args.method)
    except ValueError as err:
        print(f"moestack eval: error: {err}", file=sys.stderr)
        return 2
    print(f"val_loss {r['val_loss']:.4f}  perplexity {r['perplexity']:.2f}  drop_rate {r['drop_rate']:.3f}  "
          f"({r['batches']} batches)")
    return 0


def evaluate_with_drop(run_dir, drop_rate: float, batches: int | None = None, device: str = "auto", *, parts: int = 2,
                       calib_batches: int = 8, method: str = "dualsparse") -> dict:
    """Val loss of the run's model sparsified at `drop_rate`: {val_loss, perplexity, drop_rate (achieved)}."""
    model, cfg, ctx = _load_single(run_dir, device)
    if drop_rate > 0:
        transform(model, cfg, ctx.device, method, drop_rate, parts, calib_batches)
    return _evaluate(model, cfg, ctx, batches, sparse=drop_rate > 0)


def sparsify_run(run_dir, drop_rate: float, out=None, *, parts: int = 2, calib_batches: int = 8,
                 method: str = "dualsparse", batches: int | None = None, device: str = "auto") -> dict:
    """Sparsify a run, evaluate before and after, save model + report under `out`; returns the report."""
    model, cfg, ctx = _load_single(run_dir, device)
    before = _evaluate(model, cfg, ctx, batches, sparse=False)
    transform(model, cfg, ctx.device, method, drop_rate, parts, calib_batches)
    after = _evaluate(model, cfg, ctx, batches, sparse=True)
    out = Path(out or Path(run_dir) / "sparse")
    report = {
        "run_dir": str(run_dir), "out": str(out), "method": method, "parts": 1 if method == "naive" else parts,
        "drop_rate": drop_rate, "achieved_drop_rate": after["drop_rate"],
        "calib_batches": calib_batches, "val_batches": after["batches"],
        "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
        "val_loss_increase": after["val_loss"] / before["val_loss"] - 1,
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "device": str(ctx.device), "date": date.today().isoformat(),
    }
    spec = {"parts": report["parts"], "method": method, "drop_rate": drop_rate, "load_aware": False, "report": report}
    save_sparse(model, run_dir, out, spec)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def calibration_batches(cfg, n: int) -> list[torch.Tensor]:
    """`n` batches of token ids [B, S] from the run's training split (the validation split stays unseen)."""
    from moestack.data import Corpus

    corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
    return [corpus.batch("train", i, cfg.train.batch_size, cfg.train.seed + 1)[0] for i in range(n)]


def transform(model, cfg, device, method: str, drop_rate: float, parts: int, calib_batches: int):
    """Apply `method` at `drop_rate`, calibrating on the run's training data (bf16 autocast on GPU, as eval)."""
    batches = [b.to(device) for b in calibration_batches(cfg, calib_batches)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if method == "naive":
            naive_drop(model, batches, drop_rate)
        else:
            sparsify(model, batches, drop_rate, parts, reconstruct=method == "dualsparse")
    return model


def _evaluate(model, cfg, ctx, batches: int | None, sparse: bool) -> dict:
    from moestack.runs import evaluate

    if sparse:
        reset_drop_stats(model)
    result = evaluate(model, cfg, ctx, batches)
    return {**result, "drop_rate": drop_stats(model)["drop_rate"] if sparse else 0.0}


def _load_single(run_dir, device):
    from moestack.parallel.mesh import world_from_env
    from moestack.runs import load_model

    if world_from_env()[1] > 1:
        raise ValueError("DualSparse calibration runs on one process; start it without torchrun")
    return load_model(run_dir, device)


def fill_drop_defaults(args) -> None:
    """Give the DualSparse options left out their defaults (they default to None to tell given from not)."""
    for name, value in DROP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_args(args) -> None:
    fill_drop_defaults(args)
    if args.drop_rate is None or not 0 <= args.drop_rate < 1:
        raise ValueError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
