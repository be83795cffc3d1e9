"""Run-folder outputs a person opens: metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("moestack")


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (keys `step`, `loss`, `val_loss`, ...)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def keep_until(self, step: int) -> None:
        """On resume: keep the logged rows up to `step` (later ones will be logged again) and plot them too."""
        if self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def load_balance(counts: np.ndarray) -> np.ndarray:
    """max/mean tokens per expert for each layer: counts [L, E] -> [L] (1.0 is perfect balance)."""
    mean = counts.mean(axis=1)
    return np.where(mean > 0, counts.max(axis=1) / np.maximum(mean, 1e-9), 1.0)


def plot_run(rows: list[dict], expert_counts: np.ndarray | None, path: Path) -> bool:
    """Train/val loss curves and a heatmap of tokens per expert per layer; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'moestack[plot]'): no %s", path.name)
        return False
    panels = 2 if expert_counts is not None and expert_counts.size else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    if panels == 2:
        share = expert_counts / np.maximum(expert_counts.sum(axis=1, keepdims=True), 1)
        im = axes[0, 1].imshow(share, aspect="auto", cmap="viridis")
        axes[0, 1].set_xlabel("expert"), axes[0, 1].set_ylabel("MoE layer")
        axes[0, 1].set_xticks(range(share.shape[1])), axes[0, 1].set_yticks(range(share.shape[0]))
        axes[0, 1].set_title("share of tokens per expert")
        fig.colorbar(im, ax=axes[0, 1])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
