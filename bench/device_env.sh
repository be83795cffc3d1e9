# Sourced by the bench/device_*.sh scripts: run from the repository root with the project on PYTHONPATH,
# results in $OUT (device runs) or bench/results, and the GPU's name recorded beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
