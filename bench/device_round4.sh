#!/usr/bin/env bash
# Device calls of 2026-11-25 (third session). A = GPU tests, DualSparse speed (sync-free segments, Triton
# SwiGLU), MoE layer fwd+bwd with the Triton vs eager SwiGLU in one run, profile. Results in $OUT.
source "$(dirname "$0")/device_env.sh"
case "${1:-}" in
A)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -4
  timeout 150 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  timeout 40 python3 bench/profile_moe.py --shape mixtral --tokens 16384 --rates 0.25 --rows 14 > /dev/null 2>&1
  timeout 240 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
  ;;
B)  # after the Triton row kernels and sync-free counts
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -4
  timeout 150 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  timeout 40 python3 bench/profile_moe.py --shape qwen3_moe --tokens 16384 --rates 0.25 --rows 14 > /dev/null 2>&1
  timeout 240 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
  ;;
C)  # DualSparse speed with CUDA-graph replay columns
  timeout 300 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  ;;
D)  # strided-row (persistent) SwiGLU forward
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -4
  timeout 60 python3 bench/swiglu.py 2>&1 | grep -v "^{" | tee "$OUT/swiglu.log"
  timeout 300 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  timeout 40 python3 bench/profile_moe.py --shape mixtral --tokens 16384 --rates 0.25 --rows 14 > /dev/null 2>&1
  timeout 240 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
  ;;
E1)  # checkpoint persist: early writeback off vs on (same call), disk reference
  df -h /tmp | tail -1 | tee "$OUT/disk.txt"
  dd if=/dev/zero of=/tmp/dd.bin bs=64M count=64 oflag=direct conv=fsync 2>&1 | tail -1 | tee -a "$OUT/disk.txt"; rm -f /tmp/dd.bin
  dd if=/dev/zero of=/tmp/dd.bin bs=64M count=64 conv=fsync 2>&1 | tail -1 | tee -a "$OUT/disk.txt"; rm -f /tmp/dd.bin
  for wb in --no-early-writeback ""; do
    timeout 250 python3 bench/checkpoint.py --params 1.05e9 --reps 2 --dir /tmp --methods moestack_full,moestack_pec $wb \
      2>&1 | grep -v "^{" | tail -4 | tee -a "$OUT/checkpoint.log"
  done
  ;;
E2)  # throughput with a checkpoint every 50 steps: early writeback off vs on
  for wb in --no-early-writeback ""; do
    timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
      --train-steps 200 --every 50 $wb 2>&1 | grep -v "^{" | tail -6 | tee -a "$OUT/checkpoint_loop.log"
  done
  ;;
E3)  # throughput loop with the time inside save() and the snapshot wait reported
  timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
    --train-steps 200 --every 50 2>&1 | grep -v "^{" | tail -12 | tee -a "$OUT/checkpoint_loop.log"
  ;;
E4)  # does the snapshot copy overlap compute at all; the loop with persist times per save
  timeout 60 python3 bench/d2h_overlap.py --gib 5 --tensors 300 | tee "$OUT/d2h_overlap.log"
  timeout 60 python3 bench/d2h_overlap.py --gib 5 --tensors 300 --matmuls 80 | tee -a "$OUT/d2h_overlap.log"
  timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_pec \
    --train-steps 250 --every 50 2>&1 | grep -v "^{" | tail -8 | tee -a "$OUT/checkpoint_loop.log"
  ;;
E5)  # throughput with when_busy = defer (checkpoints deferred while a persist runs, never blocking)
  timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
    --train-steps 250 --every 50 --when-busy defer 2>&1 | grep -v "^{" | tail -12 | tee -a "$OUT/checkpoint_loop.log"
  ;;
E6)  # what a checkpoint costs the training loop, torch.save and moestack in the same run (defer)
  timeout 560 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp \
    --methods torch_save,moestack_full,moestack_pec --train-steps 250 --every 50 --when-busy defer 2>&1 \
    | grep -v "^{" | tail -14 | tee -a "$OUT/checkpoint_loop.log"
  ;;
*)
  echo "usage: bench/device_round4.sh A|B|C|D|E1|E2|E3|E4|E5|E6" >&2; exit 2
  ;;
esac
