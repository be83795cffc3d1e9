#!/usr/bin/env bash
# One device call: GPU tests of the dispatch/DualSparse code, DualSparse speed/load, MoE layer bench,
# a GPU-trained run for the DualSparse quality study, and kernel profiles. Results in $OUT.
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/moe tests/inference/test_dualsparse.py tests/inference/test_partition.py 2>&1 | tail -3
timeout 150 python3 bench/dualsparse.py --study speed,load --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
timeout 150 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
timeout 200 python3 -m moestack.cli train --model.d_model 512 --model.n_heads 8 --model.n_layers 8 --model.seq_len 256 \
  --moe.num_experts 8 --moe.d_ff 1024 --batch-size 32 --train.lr 1e-3 --train.warmup 100 --train.data_max_mb 64 \
  --device cuda --checkpoint.pec_k 0 --ckpt-every 400 --steps 2000 --model.arch top2 --run-dir /tmp/ds > /tmp/ds.log 2>&1
tail -c 400 /tmp/ds.log | tr '\r' '\n' | tail -2
timeout 100 python3 bench/dualsparse.py --run-dir /tmp/ds --study quality --batches 16 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_quality.log"
timeout 40 python3 bench/profile_moe.py --shape qwen3_moe --tokens 16384 --rates 0,0.25 --rows 14 > /dev/null 2>&1
