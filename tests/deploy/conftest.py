"""Fixtures for the deployment-file tests: the configs as the code defines them, and kustomize renders."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deploy_configs import REPO, load_configs  # noqa: E402
from deploy_render import OVERLAYS, render  # noqa: E402


@pytest.fixture(scope="session")
def configs():
    return load_configs()


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: render(REPO / "k8s/overlays" / name) for name in OVERLAYS}


@pytest.fixture()
def scratch_kustomization():
    """A folder under the repository (kustomize loads only below a kustomization's root by default, and `../` paths
    must resolve), removed afterwards."""
    base = REPO / ".run/deploy-tests"
    base.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def make(files: dict[str, str]) -> Path:
        d = Path(tempfile.mkdtemp(dir=base))
        made.append(d)
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text, encoding="utf-8")
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
