"""`moestack ckpt ls RUN_DIR` and `moestack ckpt verify RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moestack.checkpoint.recovery import Verifier, resolve_sources
from moestack.checkpoint.storage import Checkpoint, CheckpointError, list_committed, read_latest


def add_ckpt_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `ckpt ls|verify RUN_DIR` to a subparsers object; the parsed args run with `run_ckpt`."""
    parser = subparsers.add_parser("ckpt", help="list or verify the checkpoints of a run")
    sub = parser.add_subparsers(dest="ckpt_cmd", required=True)
    ls = sub.add_parser("ls", help="table of checkpoints: step, size, experts held, PLT, status")
    ls.add_argument("run_dir", type=Path, help="run folder (its checkpoints are in RUN_DIR/ckpt)")
    verify = sub.add_parser("verify", help="check every shard's sha256 and the manifests; "
                                           "exit 0 only if the newest checkpoint is intact")
    verify.add_argument("run_dir", type=Path, help="run folder (its checkpoints are in RUN_DIR/ckpt)")
    parser.set_defaults(func=run_ckpt)
    return parser


def run_ckpt(args: argparse.Namespace) -> int:
    """Run `ckpt ls` or `ckpt verify`; return the process exit code."""
    root = ckpt_root(Path(args.run_dir))
    if args.ckpt_cmd == "ls":
        return _ls(root)
    return _verify(root)


def ckpt_root(run_dir: Path) -> Path:
    """RUN_DIR/ckpt, or RUN_DIR itself when it is already a checkpoint folder."""
    return run_dir if (run_dir / "latest").exists() and not (run_dir / "ckpt").is_dir() else run_dir / "ckpt"


def _ls(root: Path) -> int:
    committed = list_committed(root)
    if not committed:
        print(f"no checkpoints in {root}")
        return 1
    latest = read_latest(root)
    verifier = Verifier()
    rows = [("step", "size", "experts", "PLT", "status", "")]
    bad: list[str] = []
    for step, path in committed:
        problems = verifier.problems(path)
        bad += problems
        rows.append((str(step), _size(path), *_describe(path), "ok" if not problems else "BAD",
                     "<- latest" if path.name == latest else ""))
    print(f"checkpoints in {root}")
    _table(rows)
    for problem in bad:
        print(f"  BAD: {problem}")
    return 0


def _describe(path: Path) -> tuple[str, str]:
    """(experts held per layer, PLT) from a manifest, or ('?', '?') when it is unreadable."""
    try:
        manifest = Checkpoint.open(path).manifest
    except CheckpointError:
        return "?", "?"
    num = manifest["pec"]["num_experts"]
    held = sorted({len(s) for s in manifest["pec"]["selected"]})
    experts = ",".join(f"{h}/{num}" for h in held) if held else "-"
    plt = "n/a" if manifest.get("plt") is None else f"{100 * manifest['plt']:.2f}%"
    return experts, plt


def _verify(root: Path) -> int:
    committed = list_committed(root)
    if not committed:
        print(f"BAD: no committed checkpoint in {root}")
        return 1
    verifier = Verifier()
    for step, path in reversed(committed):
        problems = verifier.problems(path)
        print(f"{path.name}: {'ok' if not problems else 'BAD'}")
        for problem in problems:
            print(f"  BAD file: {problem}")
    newest = committed[-1][1]
    intact = not verifier.problems(newest) and _experts_ok(newest, committed, verifier)
    latest = read_latest(root)
    if (root / "latest").exists() and (latest is None or not (root / latest).is_dir()):
        text = (root / "latest").read_text(errors="replace").strip()[:80]
        print(f"  BAD: {root / 'latest'} holds {text!r}, which names no checkpoint here (loading ignores it and "
              "takes the newest committed checkpoint)")
    print(f"newest checkpoint {newest.name}: {'intact' if intact else 'NOT intact'}")
    return 0 if intact else 1


def _experts_ok(newest: Path, committed: list[tuple[int, Path]], verifier: Verifier) -> bool:
    """Whether every expert the newest (partial) checkpoint lacks has an intact older copy."""
    try:
        target = Checkpoint.open(newest)
        resolve_sources(target, [p for s, p in committed if s < target.step], verifier)
    except CheckpointError as e:
        print(f"  BAD: {e}")
        return False
    return True


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(w) if i < 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
