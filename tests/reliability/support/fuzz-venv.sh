#!/usr/bin/env bash
# The reliability suite's "Bad input" part fuzzes the gateway with schemathesis (PyPI), kept in a venv of its own so
# that neither the worker's venv nor the system Python changes. Made once, reused while its pinned version matches;
# prints the path of the `st` executable. SCHEMATHESIS_VENV overrides where the venv lives.
set -euo pipefail
VERSION="4.32.5"
VENV="${SCHEMATHESIS_VENV:-$HOME/.cache/llm-gateway/schemathesis-venv-$VERSION}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/st" ] || ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '$VERSION')" 2>/dev/null; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet "schemathesis==$VERSION" >&2
fi
echo "$VENV/bin/st"
