"""Validation loss curves of several runs on one plot: python bench/quality_plot.py a.jsonl b.jsonl --out p.png"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files; the label is the file stem")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for path in args.metrics:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", label=f"{Path(path).stem} (final {val[-1][1]:.4f})")
            print(f"{Path(path).stem}: final val loss {val[-1][1]:.4f} at step {val[-1][0]}")
    ax.set_xlabel("step"), ax.set_ylabel("validation loss"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
