"""A training-like process that checkpoints in a loop until it is killed (the subject of test_crash.py).

    python crash_worker.py RUN_DIR
Imports torch once, then serves lines on stdin so each trial starts in milliseconds:
    go SEED   fork a worker that resumes from the newest good checkpoint of RUN_DIR and saves every
              step (async, PEC K=2 load-aware, keep=2) until killed; print its pid
    reap PID  wait for a killed worker
The state is ~5 MB; its values are a function of the step (tests/checkpoint/helpers.py), so a test can
check every restored tensor.
"""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np
import torch

from moestack.checkpoint import CheckpointConfig, CheckpointManager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import NUM_EXPERTS, NUM_LAYERS, make_state  # noqa: E402

CFG = CheckpointConfig(every=1, keep=2, pec_k=2, pec_policy="load_aware", when_busy="wait")
STATE = {"dense": (512, 512), "expert_shape": (64, 128)}


def tokens(step: int) -> torch.Tensor:
    """Skewed, deterministic expert loads of one step: int64 [L, E]."""
    rng = np.random.default_rng(step)
    return torch.from_numpy(rng.zipf(1.5, size=(NUM_LAYERS, NUM_EXPERTS)).clip(max=1000).astype(np.int64))


def train_forever(run_dir: str, seed: int) -> None:
    """Resume, then save every step until killed."""
    random.seed(seed)
    torch.set_num_threads(1)
    mgr = CheckpointManager(run_dir, CFG)
    step = 0
    if mgr.latest_good() is not None:
        _, meta, _ = mgr.load()
        step = int(meta["step"])
    while True:
        step += 1
        tensors, experts = make_state(step, **STATE)
        mgr.save(step, tensors, experts, {"step": step}, tokens(step))
        time.sleep(random.uniform(0.0, 0.01))  # "compute" between checkpoints


def main() -> None:
    run_dir = sys.argv[1]
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "go":
            pid = os.fork()
            if pid == 0:
                try:
                    train_forever(run_dir, int(arg))
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif cmd == "reap":
            os.waitpid(int(arg), 0)
            print("reaped", flush=True)


if __name__ == "__main__":
    main()
