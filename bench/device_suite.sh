#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md, grouped to fit few device calls.
#   bash bench/device_suite.sh benches      # MoE layer, checkpoint overhead, training throughput probe
#   bash bench/device_suite.sh quality N    # top2 / shared_top1 / scmoe side by side for N steps, then DualSparse
# Results go to $OUT (device runs) or bench/results.
source "$(dirname "$0")/device_env.sh"
QUALITY="--model.d_model 512 --model.n_heads 8 --model.n_layers 8 --model.seq_len 256 --moe.num_experts 8
 --moe.d_ff 1024 --batch-size 32 --train.lr 1e-3 --train.warmup 100 --train.data_max_mb 64
 --train.eval_every 200 --train.eval_batches 16 --train.log_every 50 --device cuda"
moestack() { python3 -m moestack.cli "$@"; }

case "${1:-}" in
benches)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
  timeout 200 python3 bench/moe_layer.py --reps 10 2>&1 | tee "$OUT/moe_layer.log" | grep -v "^{"
  timeout 240 python3 bench/checkpoint.py --params 1.1e9 --reps 1 2>&1 | tail -20 | tee "$OUT/checkpoint.log"
  # throughput probe for the quality runs: the three archs at once on one GPU, 100 steps
  start=$(date +%s)
  for arch in top2 shared_top1 scmoe; do
    moestack train $QUALITY --model.arch $arch --steps 100 --train.eval_every 0 --ckpt-every 0 \
      --run-dir /tmp/probe-$arch > /tmp/probe-$arch.log 2>&1 &
  done
  wait
  echo "probe: 100 steps x 3 archs concurrently took $(( $(date +%s) - start )) s" | tee "$OUT/probe.txt"
  tail -n 2 /tmp/probe-*/metrics.jsonl | tee -a "$OUT/probe.txt"
  ;;
quality)
  # docs/methods/scmoe.md's runs (evaluations every 200 steps); --ckpt-every $steps only adds the final
  # checkpoint the DualSparse step below loads (saving does not change the losses)
  steps=${2:?steps}
  for arch in top2 shared_top1 scmoe; do
    moestack train $QUALITY --model.arch $arch --steps "$steps" --ckpt-every "$steps" --checkpoint.pec_k 0 \
      --run-dir /tmp/q-$arch > /tmp/q-$arch.log 2>&1 &
  done
  wait
  for arch in top2 shared_top1 scmoe; do
    cp /tmp/q-$arch/metrics.jsonl "$OUT/quality-$arch.jsonl"; tail -n 3 /tmp/q-$arch.log | tr '\r' '\n' | tail -n 2
  done
  python3 bench/quality_plot.py "$OUT"/quality-*.jsonl --out "$OUT/scmoe_quality.png"
  if [ -f bench/dualsparse.py ]; then
    timeout 240 python3 bench/dualsparse.py --run-dir /tmp/q-top2 2>&1 | tail -30 | tee "$OUT/dualsparse.log"
  fi
  ;;
*) echo "usage: $0 benches | quality STEPS" >&2; exit 2 ;;
esac
