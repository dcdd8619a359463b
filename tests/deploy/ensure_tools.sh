#!/usr/bin/env bash
# Makes a kustomize renderer available to tests/deploy, idempotently, and prints which one (one line).
# Order: $KUSTOMIZE (a kustomize binary) > .run/tools/kustomize > `kubectl kustomize` (kubectl ships kustomize) >
# `go install` of the pinned kustomize into .run/tools/ (Go module proxy; about a minute the first time, 2 cores).
# tests/deploy/conftest.py resolves the tool in the same order and runs this script when it finds none.
set -euo pipefail

KUSTOMIZE_VERSION="v5.5.0"  # the kustomize inside kubectl 1.32; both render the overlays identically
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="$root/.run/tools"

if [[ -n "${KUSTOMIZE:-}" && -x "${KUSTOMIZE}" ]]; then
  echo "[deploy tools] kustomize: \$KUSTOMIZE=$KUSTOMIZE"
  exit 0
fi
# `go install` builds report "(devel)" as their version: a stamp file records which one was built.
if [[ -x "$tools/kustomize" && "$(cat "$tools/kustomize.version" 2>/dev/null)" == "$KUSTOMIZE_VERSION" ]]; then
  echo "[deploy tools] kustomize: $tools/kustomize ($KUSTOMIZE_VERSION)"
  exit 0
fi
if [[ -z "${DEPLOY_TOOLS_FORCE_GO:-}" ]] && command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  echo "[deploy tools] kustomize: kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'built in'))"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "[deploy tools] neither kubectl nor go found: install kubectl, or Go to build kustomize $KUSTOMIZE_VERSION" >&2
  exit 1
fi
mkdir -p "$tools"
echo "[deploy tools] building kustomize $KUSTOMIZE_VERSION into $tools (go install, about a minute)" >&2
GOBIN="$tools" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2
echo "$KUSTOMIZE_VERSION" > "$tools/kustomize.version"
echo "[deploy tools] kustomize: $tools/kustomize ($KUSTOMIZE_VERSION)"
