"""Fixtures for the deployment-file tests: the configs as the code defines them, and kustomize renders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deploy_configs import REPO, load_configs  # noqa: E402

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


@pytest.fixture(scope="session")
def configs():
    return load_configs()


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: render(REPO / "k8s/overlays" / name) for name in OVERLAYS}


@pytest.fixture()
def scratch_kustomization(tmp_path_factory):
    """A folder under the repository (kustomize loads only below a kustomization's root by default, and `../` paths
    must resolve), removed afterwards."""
    base = REPO / ".run/deploy-tests"
    base.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def make(files: dict[str, str]) -> Path:
        d = Path(__import__("tempfile").mkdtemp(dir=base))
        made.append(d)
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text, encoding="utf-8")
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
