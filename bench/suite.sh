#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md, in named groups that one device call can run together:
#   bash bench/suite.sh tests serve            # run the groups in order; results (logs, JSON lines) in $OUT
#   bash bench/suite.sh --list                 # the groups and what each runs
# Results go to $OUT (device runs) or bench/results, each group's log as $OUT/<group>.log; the docs name the
# group that made each figure. A group that fails is reported and the next one still runs. More than 8 files
# in a device run's $OUT are packed into $OUT/results.tgz at the end (a device call returns at most 8).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
py() { local t=$1; shift; timeout "$t" python3 "$@" 2>&1 | grep -v '^{'; }  # py SECONDS SCRIPT ARGS: JSON lines go to the .jsonl files

declare -A HELP=(
  [tests]="the gpu- and triton-marked tests (fast paths against the eager references, on the GPU)"
  [kernel_tests]="the GPU tests of the kernels changed on 2026-12-07 only (fused MoE with DualSparse parts, segment planning, training combine, ReaLB FP8): about two minutes"
  [serve_tests]="the engine's GPU tests (CUDA-graph steps against HF generate, every family; fused kernels against the eager engine) and the decode step's Triton kernels against their eager references (qkv tail, add + RMSNorm, argmax, router top-k, align, sum over choices)"
  [layer]="bench/moe_layer.py: MoE layer fwd+bwd against HF grouped_mm and the dense ceiling (Mixtral, OLMoE, Qwen3-MoE shapes)"
  [profile_layer]="bench/profile_moe.py --train: kernel tables of the layer's fwd+bwd and the dense ceiling's (Mixtral, OLMoE 8k)"
  [profile_dualsparse]="bench/profile_moe.py --rates 0,0.25,0.5: kernel tables of the DualSparse layer (inference) at Qwen3-MoE 4k/16k and Mixtral 4k tokens"
  [dualsparse]="bench/dualsparse.py --study speed: layer time vs drop rate 0/25/50%, eager and CUDA graphs, 4k/16k/32k tokens"
  [combine]="bench/combine.py: the weighted combine kernels"
  [swiglu]="bench/swiglu.py: the SwiGLU row kernels"
  [train]="bench/train_step.py --compile: the training step, bf16 autocast, fp32 vs bf16 rows, compiled"
  [checkpoint]="bench/checkpoint.py: save cost of torch.save / moestack full / PEC, then the training loop with a checkpoint every 50 steps"
  [disk]="dd: the disk's write bandwidth (the checkpoint figures' reference)"
  [serve]="bench/serve.py: engine vs HF generate at OLMoE / Qwen3-30B-A3B / Mixtral shapes, 4 layers, batch 1/8/64, mixed workload"
  [serve_fixed]="bench/serve.py --mixed 0: engine vs HF generate at the three shapes, batch 1/8/64 only (no mixed workload)"
  [serve_b8]="bench/serve.py --batches 8 --mixed 0: engine vs HF generate at the three shapes, batch 8 only (the decode >= 5x HF target)"
  [serve_b8_moe]="bench/serve.py --models olmoe,qwen3_moe --batches 8 --mixed 0: the two shapes where batch-8 decode was under 5x HF"
  [dualsparse_tests]="the DualSparse GPU tests: whole sub-expert kernel against the sorts (also in a CUDA graph, with padding), segment kernels, graphs of the sparse layer"
  [cuda_tests]="tests/serve/test_cuda.py only: the engine's CUDA-graph steps against HF generate and the dense forward (the quick part of serve_tests)"
  [serve_prefill64]="bench/serve.py --models mixtral --batches 64 --mixed 0: the one prefill point under 1.4x HF (Mixtral, batch 64)"
  [profile_decode]="bench/serve.py --profile --batches 8: kernel tables of the engine's steps at OLMoE and Qwen3-30B-A3B shapes, batch 8 (where decode is under 5x HF)"
  [decode_pieces]="bench/decode_pieces.py: the batch-8 decode step's pieces alone in CUDA graphs (dense projections cuBLAS vs the fused MoE GEMM, expert GEMMs, paged decode key tiles, argmax) with their HBM rates"
  [serve_full]="bench/serve.py --models olmoe --layers 16: every layer of OLMoE-1B-7B"
  [serve_dualsparse]="bench/serve.py --drop-rates 0.25: DualSparse at 25% drop (policies auto and token) against no dropping, end to end in the engine, timed runs taking turns"
  [serve_http]="bench/serve_http.py: the HTTP server at 1/8/32 clients against the offline engine"
  [realb]="bench/realb_kernels.py (the FP8 path piece by piece), then bench/realb.py --study speed: ReaLB vs BF16 / FP8 everywhere / EPLB per EP rank at Qwen3-VL-30B-A3B and Mixtral shapes, traced VLM routing"
  [fssdp]="bench/fssdp_sim.py: EP vs FSSDP vs FSSDP-RM step-time model at 8-64 GPUs, GEMM and attention times measured here"
)

run_group() {
  case "$1" in
  tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" --tb=short -rfE tests 2>&1 | grep -v Warning ;;
  kernel_tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/serve/test_triton.py tests/moe/test_dispatch.py \
      tests/inference/test_realb.py -k "fused or dualsparse or segment or gpu or training" 2>&1 | grep -v Warning ;;
  serve_tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/serve/test_cuda.py tests/serve/test_triton.py \
      tests/moe/test_router.py -m "gpu or triton" -k "cuda or qkv or add_rms or argmax or sum_choices or align_kernel or fused_topk or engine" \
      2>&1 | grep -v Warning ;;
  layer) py 300 bench/moe_layer.py --reps 10 --skip-loop --shapes mixtral,olmoe,qwen3_moe ;;
  profile_layer)
    for s in mixtral olmoe; do
      timeout 120 python3 bench/profile_moe.py --shape $s --tokens 8192 --train --rows 30 > "$OUT/profile_layer_$s.txt" 2>&1
      grep -A40 '^## plain' "$OUT/profile_layer_$s.txt" | head -45
    done; rm -f "$OUT/profile_moe.txt" ;;
  profile_dualsparse)
    for st in qwen3_moe:4096 qwen3_moe:16384 mixtral:4096; do
      timeout 120 python3 bench/profile_moe.py --shape ${st%:*} --tokens ${st#*:} --rates 0,0.25,0.5 --rows 25 \
        > "$OUT/profile_dualsparse_${st%:*}_${st#*:}.txt" 2>&1
      grep -E '^## |Self CUDA time total' "$OUT/profile_dualsparse_${st%:*}_${st#*:}.txt"
    done
    rm -f "$OUT/profile_moe.txt" ;;
  dualsparse) py 300 bench/dualsparse.py --study speed --reps 10 --rates 0,0.25,0.5 --tokens 4096,16384,32768 ;;
  combine) py 150 bench/combine.py --reps 20 ;;
  swiglu) py 60 bench/swiglu.py ;;
  fssdp)
    timeout 300 python3 bench/fssdp_sim.py --trace bench/results/trace_default_run.npz --steps 20 > "$OUT/fssdp_sim.out" 2>&1
    grep -v '^{' "$OUT/fssdp_sim.out"; grep '^{' "$OUT/fssdp_sim.out" > "$OUT/fssdp_sim.jsonl" ;;
  train) py 240 bench/train_step.py --reps 10 --compile ;;
  checkpoint)
    py 560 bench/checkpoint.py --params 1.05e9 --reps 1 --dir /tmp \
      --methods torch_save,moestack_full,moestack_pec --train-steps 250 --every 50 --when-busy defer ;;
  disk)
    df -h /tmp | tail -1
    dd if=/dev/zero of=/tmp/dd.bin bs=64M count=64 oflag=direct conv=fsync 2>&1 | tail -1; rm -f /tmp/dd.bin ;;
  serve) py 420 bench/serve.py --mixed 128 ;;
  serve_fixed) py 420 bench/serve.py --mixed 0 ;;
  serve_b8) py 300 bench/serve.py --batches 8 --mixed 0 ;;
  serve_b8_moe) py 200 bench/serve.py --models olmoe,qwen3_moe --batches 8 --mixed 0 ;;
  dualsparse_tests)
    timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/inference/test_dualsparse.py -m "gpu or triton" \
      2>&1 | grep -v Warning ;;
  cuda_tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/serve/test_cuda.py 2>&1 | grep -v Warning ;;
  serve_prefill64) py 120 bench/serve.py --models mixtral --batches 64 --mixed 0 ;;
  profile_decode) py 240 bench/serve.py --models olmoe,qwen3_moe --batches 8 --mixed 0 --no-hf --profile ;;
  decode_pieces) py 180 bench/decode_pieces.py ;;
  serve_full) py 300 bench/serve.py --models olmoe --layers 16 --batches 8,64 --mixed 0 ;;
  serve_dualsparse) py 420 bench/serve.py --batches 8 --mixed 0 --no-hf --drop-rates 0.25 --drop-batches 8,64 ;;
  serve_http) py 300 bench/serve_http.py ;;
  realb) py 120 bench/realb_kernels.py; py 420 bench/realb.py --study speed --reps 10 ;;
  esac
}

if [ $# -eq 0 ] || [ "$1" = "--list" ]; then
  for g in tests kernel_tests serve_tests cuda_tests dualsparse_tests layer profile_layer profile_dualsparse dualsparse combine swiglu train checkpoint disk serve \
           serve_fixed serve_b8 serve_b8_moe serve_prefill64 profile_decode decode_pieces serve_full serve_dualsparse serve_http realb fssdp; do
    printf '  %-17s %s\n' "$g" "${HELP[$g]}"
  done
  [ $# -eq 0 ] && { echo "usage: bash bench/suite.sh GROUP..." >&2; exit 2; }
  exit 0
fi
for g in "$@"; do
  [ -n "${HELP[$g]:-}" ] || { echo "unknown group '$g'; bash bench/suite.sh --list names them" >&2; exit 2; }
done
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u +%FT%TZ; } | tee "$OUT/gpu.txt"
status=0
for g in "$@"; do
  echo "=== $g ($(date -u +%FT%TZ)): ${HELP[$g]:-?}"
  start=$(date +%s)
  run_group "$g" 2>&1 | tee "$OUT/$g.log"
  rc=${PIPESTATUS[0]}
  echo "=== $g: exit $rc, $(( $(date +%s) - start )) s"
  [ "$rc" -ne 0 ] && status=1
done
# a device call returns at most 8 files from $OUT: past that, everything goes back as one archive
if [ "$(realpath "$OUT")" != "$(realpath bench/results)" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar czf /tmp/suite_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/suite_results.tgz "$OUT/results.tgz"
  echo "results packed into $OUT/results.tgz (more than 8 files)"
fi
exit $status
