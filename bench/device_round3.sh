#!/usr/bin/env bash
# Device calls of 2026-11-25 (second session): A = GPU tests, permutation round trip, DualSparse speed,
# profile; B = checkpoint overhead and throughput at >= 1B parameters. Results in $OUT.
source "$(dirname "$0")/device_env.sh"
case "${1:-}" in
A)
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -3
  timeout 120 python3 bench/combine.py --reps 20 2>&1 | grep -v "^{" | tee "$OUT/combine.log"
  timeout 150 python3 bench/dualsparse.py --study speed,load --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  timeout 40 python3 bench/profile_moe.py --shape qwen3_moe --tokens 16384 --rates 0.25 --rows 16 > /dev/null 2>&1
  ;;
B)
  df -h /tmp | tail -1 | tee "$OUT/disk.txt"
  dd if=/dev/zero of=/tmp/dd.bin bs=16M count=256 oflag=direct conv=fsync 2>&1 | tail -1 | tee -a "$OUT/disk.txt"; rm -f /tmp/dd.bin
  timeout 540 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --train-steps 200 --every 50 2>&1 \
    | grep -v "^{" | tee "$OUT/checkpoint.log"
  ;;
C1)
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -3
  timeout 200 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
  timeout 150 python3 bench/combine.py --reps 20 2>&1 | grep -v "^{" | tee "$OUT/combine.log"
  timeout 150 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  ;;
C2)
  timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp 2>&1 | grep -v "^{" | tee "$OUT/checkpoint.log"
  timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
    --train-steps 200 --every 50 2>&1 | grep -v "^{" | tee "$OUT/checkpoint_loop.log"
  ;;
D)
  for cfg in "8 4" "64 2"; do
    set -- $cfg
    timeout 280 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
      --train-steps 200 --every 50 --write-chunk-mb "$1" --writers "$2" 2>&1 | grep -v "^{" | tee "$OUT/checkpoint_loop_$1_$2.log"
  done
  ;;
E)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests 2>&1 | tail -3
  timeout 240 python3 bench/moe_layer.py --reps 10 --skip-loop 2>&1 | grep -v "^{" | tee "$OUT/moe_layer.log"
  timeout 150 python3 bench/dualsparse.py --study speed --reps 10 2>&1 | grep -v "^{" | tee "$OUT/dualsparse_speed.log"
  ;;
F)
  timeout 400 python3 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp --methods moestack_full,moestack_pec \
    --train-steps 200 --every 50 2>&1 | grep -v "^{" | tee "$OUT/checkpoint_loop.log"
  ;;
*) echo "usage: $0 A | B | C1 | C2 | D | E | F" >&2; exit 2 ;;
esac
