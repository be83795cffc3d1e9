#!/usr/bin/env bash
# What the CPU-only session of 2026-11-28 owes one GPU (one device call, about 5 minutes; results in $OUT):
# the GPU/Triton tests, and the training step under bf16 autocast with bf16 vs fp32 MoE rows and compiled.
# The checkpoint loop re-run is its own call: bash bench/device_round4.sh E6 (up to 560 s).
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
timeout 240 python3 bench/train_step.py --reps 10 --compile 2>&1 | grep -v "^{" | tee "$OUT/train_step.log"
