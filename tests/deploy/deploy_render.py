"""Rendering kustomizations for the deployment tests (kept out of conftest.py so test modules can import it by a
unique name: several suites run in one pytest process, each with its own conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from deploy_configs import REPO

HERE = Path(__file__).resolve().parent
OVERLAYS = ("cpu", "gpu")


def kustomize_command() -> list[str]:
    """The renderer, in the order ensure_tools.sh prefers; runs ensure_tools.sh when none is found."""
    if os.environ.get("KUSTOMIZE") and os.access(os.environ["KUSTOMIZE"], os.X_OK):
        return [os.environ["KUSTOMIZE"], "build"]
    local = REPO / ".run/tools/kustomize"
    if local.exists():
        return [str(local), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    subprocess.run(["bash", str(HERE / "ensure_tools.sh")], check=True)
    if local.exists():
        return [str(local), "build"]
    raise RuntimeError("no kustomize: run tests/deploy/ensure_tools.sh")


def render(path: Path) -> list[dict]:
    out = subprocess.run([*kustomize_command(), str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kustomize build {path} failed:\n{out.stderr}")
    return [o for o in yaml.safe_load_all(out.stdout) if o]
