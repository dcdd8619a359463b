#!/usr/bin/env bash
# Configuration sweep + profile in one call: bash bench/gpu/sweep.sh [sweep.py flags]
# Writes $OUT/sweep_results.json (OUT defaults to bench/out), $OUT/sweep.log and $OUT/nvidia_smi.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 bench/gpu/sweep.py --out "$OUT/sweep_results.json" "$@" 2>&1 | tee "$OUT/sweep.log"
