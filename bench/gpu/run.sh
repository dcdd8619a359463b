#!/usr/bin/env bash
# GPU benchmark in one call: bash bench/gpu/run.sh [bench.py flags]
# Writes $OUT/gpu_results.json (OUT defaults to bench/out), $OUT/bench.log and $OUT/serve.log.
# Wheels for `transformers serve` (fastapi, uvicorn, pydantic, openai, ...) are read from .whl/ when present and
# installed into /tmp/site, which only the serve subprocess sees (PYTHONPATH); see bench/gpu/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SITE_ARGS=()
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    SITE_ARGS=(--site /tmp/site)
  else
    echo "wheel install failed: transformers serve may not start" >&2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 bench/gpu/bench.py --out "$OUT/gpu_results.json" ${SITE_ARGS[@]+"${SITE_ARGS[@]}"} "$@" 2>&1 | tee "$OUT/bench.log"
