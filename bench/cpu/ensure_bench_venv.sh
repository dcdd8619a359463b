#!/usr/bin/env bash
# Create/refresh bench/.venv: a small venv LAYERED on the worker's venv (default worker-py/.venv, override with
# BENCH_BASE_VENV), plus bench/requirements.txt. Why layered: every server in the comparison (our worker, the tutorial
# baseline, `transformers serve`) must run the same torch/transformers build, and a second copy of PyPI's CUDA torch would
# cost several GB for nothing. A .pth file appends the base venv's site-packages to sys.path; packages installed here come
# first on sys.path, so the worker's own venv is never modified. Idempotent (stamp = sha256 of inputs). Progress on stderr.
set -euo pipefail
bench="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="$(dirname "$bench")"
base="${BENCH_BASE_VENV:-$root/worker-py/.venv}"
venv="$bench/.venv"
stamp="$venv/.bench-stamp"
[[ -x "$base/bin/python" ]] || { echo "[bench-venv] base venv $base missing (run worker-py/scripts/ensure_venv.sh)" >&2; exit 1; }
base_site="$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
want="$( (cat "$bench/requirements.txt" "${BASH_SOURCE[0]}"; echo "$base_site") | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi
echo "[bench-venv] preparing $venv on top of $base" >&2
rm -rf "$venv"
"$(readlink -f "$base/bin/python")" -m venv "$venv"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$site/_bench_base_venv.pth"
"$venv/bin/python" -m pip install --quiet -r "$bench/requirements.txt" >&2
"$venv/bin/python" -c 'import torch, transformers, fastapi, uvicorn, aiohttp, openai' >&2
echo "$want" > "$stamp"
echo "[bench-venv] ready" >&2
