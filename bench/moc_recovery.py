"""MoC recovery quality: train, fail, recover from PEC checkpoints (or full ones) and continue; compare the
final validation loss with a run that never failed, and report the portion of lost tokens (PLT).

    python bench/moc_recovery.py                     # CPU: the default model, 300 steps, failure at step 230
    python bench/moc_recovery.py --steps 2000 --fail-at 1530 --every 100 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402

from moestack.config import load_config  # noqa: E402
from moestack.parallel.mesh import ParallelContext, pick_device  # noqa: E402
from moestack.train import Trainer  # noqa: E402


def run(overrides: dict, root: Path, name: str, fail_at: int | None) -> dict:
    """Train to the end; with `fail_at`, drop the trainer at that step (a crash) and resume a new one."""
    cfg = load_config(overrides=overrides)
    ctx = ParallelContext(device=pick_device(cfg.train.device))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, ctx, run_dir)
    report = None
    while trainer.step < cfg.train.steps:
        trainer.train_step()
        if fail_at is not None and trainer.step == fail_at:
            trainer.ckpt.wait()
            trainer.ckpt.close()
            trainer = Trainer(cfg, ctx, run_dir, resuming=True)  # a fresh process after the crash
            trainer.resume()
            report = trainer.resume_report
            fail_at = None
        elif cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0:
            trainer.save_checkpoint()
    trainer.ckpt.wait()
    trainer.ckpt.close()
    row = {"run": name, "val_loss": trainer.evaluate()}
    if report is not None:
        row.update(resumed_from=report.step, plt=report.plt, stale_experts=report.stale_experts)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--fail-at", type=int, default=230)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--pec-k", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides key=value")
    args = ap.parse_args()
    base = {"train.steps": str(args.steps), "train.device": args.device, "train.eval_every": "0",
            "checkpoint.every": str(args.every), **dict(kv.split("=", 1) for kv in args.set)}
    root = Path(tempfile.mkdtemp(prefix="moc-recovery-"))
    rows = [
        run({**base, "checkpoint.every": "0"}, root, "never failed (baseline)", None),
        run({**base, "checkpoint.pec_k": "0"}, root, "failed, full checkpoints", args.fail_at),
        run({**base, "checkpoint.pec_k": str(args.pec_k), "checkpoint.pec_policy": "sequential"}, root, "failed, PEC sequential", args.fail_at),
        run({**base, "checkpoint.pec_k": str(args.pec_k), "checkpoint.pec_policy": "load_aware"}, root, "failed, PEC load_aware", args.fail_at),
    ]
    for r in rows:
        r["vs_baseline"] = r["val_loss"] / rows[0]["val_loss"] - 1
        r.update(steps=args.steps, fail_at=args.fail_at, every=args.every, pec_k=args.pec_k, device=args.device)
    print_table(rows, ["run", "val_loss", "vs_baseline", "resumed_from", "plt", "stale_experts"])
    write_results("moc_recovery", rows)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
