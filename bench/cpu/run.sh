#!/usr/bin/env bash
# The CPU benchmark in one command: prepares what is missing (npm packages, worker-py/.venv, bench/.venv), then runs
# bench/cpu/run_all.py — ceiling, (b) tutorial baseline, (c) transformers serve with and without continuous batching,
# (a) this stack, and the stack's overhead with the stand-in engine — prints the figures and appends a dated section to
# bench/RESULTS.md. Arguments go to run_all.py (--help). Takes ~15 min on 2 cores; run it on a quiet machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash worker-py/scripts/ensure_venv.sh
bash bench/cpu/ensure_bench_venv.sh
exec bench/.venv/bin/python bench/cpu/run_all.py "$@"
