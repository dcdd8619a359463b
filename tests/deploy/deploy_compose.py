"""docker-compose.yml: interpolation as Compose does it, and the checks the compose-spec schema cannot make."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import urlparse

from deploy_configs import ConfigInfo
from deploy_docker import DOCKERFILES, health_probe
from deploy_k8s import READY_PATHS

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def read_env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip().strip("'\"")
    return out


def variables_used(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(variables_used(v) | variables_used(k) for k, v in node.items())) if node else set()
    if isinstance(node, list):
        return set().union(*(variables_used(v) for v in node)) if node else set()
    if isinstance(node, str):
        return {m.group(1) or m.group(4) for m in _VAR.finditer(node) if m.group(1) or m.group(4)}
    return set()


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $$."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return interpolate(arg, env) if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else interpolate(arg, env)
        return value or ""

    return _VAR.sub(sub, node)


def service_component(svc: dict) -> Optional[str]:
    image = str(svc.get("image", ""))
    if image.split(":")[0] in DOCKERFILES:
        return DOCKERFILES[image.split(":")[0]][1]
    return None


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.partition("=")[::2] for e in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def healthcheck_text(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test", "")
    return " ".join(test) if isinstance(test, list) else str(test)


def check_compose(raw: dict, cfgs: dict[str, ConfigInfo], env_example: dict[str, str], env: dict[str, str]) -> list[str]:
    """Problems with a compose document, interpolated with ``env`` as Compose would (the .env file's values)."""
    p: list[str] = _check_env_example(raw, env_example)
    doc = interpolate(raw, env)
    services: dict[str, dict] = doc.get("services", {})
    redis_services = {n for n, s in services.items() if str(s.get("image", "")).startswith("redis:")}
    if len(redis_services) != 1:
        return p + [f"expected one redis service, found {sorted(redis_services)}"]
    (redis_name,) = redis_services
    redis = services[redis_name]
    cmd = " ".join(map(str, redis.get("command") or []))
    if not re.search(r"--appendonly\s+yes", cmd):
        p.append(f"{redis_name}: no --appendonly yes (queued jobs would not survive a restart)")
    if not re.search(r"--maxmemory-policy\s+noeviction", cmd):
        p.append(f"{redis_name}: no --maxmemory-policy noeviction (BullMQ requires it)")
    if not any(str(v).endswith(":/data") for v in redis.get("volumes") or []):
        p.append(f"{redis_name}: /data is not on a volume")
    redis_port = int(m.group(1)) if (m := re.search(r"--port\s+(\d+)", cmd)) else 6379
    if not healthcheck_text(redis):
        p.append(f"{redis_name}: no healthcheck")

    for name, svc in services.items():
        comp = service_component(svc)
        if name == redis_name:
            continue
        if comp is None:
            p.append(f"{name}: image {svc.get('image')!r} is none of {sorted(DOCKERFILES)}")
            continue
        cfg = cfgs[comp]
        env = service_env(svc)
        dockerfile = (svc.get("build") or {}).get("dockerfile")
        if dockerfile != DOCKERFILES[str(svc["image"]).split(":")[0]][0]:
            p.append(f"{name}: image {svc['image']} is built from {dockerfile}, expected the matching Dockerfile")
        p += cfg.check_env(env, f"{name} environment")
        url = urlparse(cfg.effective(env, "REDIS_URL") or "")
        if url.hostname != redis_name or (url.port or 6379) != redis_port:
            p.append(f"{name}: REDIS_URL points at {url.hostname}:{url.port or 6379}, "
                     f"Redis is service {redis_name!r} on {redis_port}")
        dep = (svc.get("depends_on") or {}).get(redis_name) if isinstance(svc.get("depends_on"), dict) else None
        if not dep or dep.get("condition") != "service_healthy":
            p.append(f"{name}: does not wait for {redis_name} with condition service_healthy")
        for target, d in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            if target not in services:
                p.append(f"{name}: depends_on unknown service {target}")
            elif d.get("condition") == "service_healthy" and not healthcheck_text(services[target]):
                p.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")

        port_var = "PORT" if comp == "gateway" else "METRICS_PORT"
        port = int(cfg.effective(env, port_var))
        probe = health_probe(healthcheck_text(svc))
        if probe is None:
            p.append(f"{name}: healthcheck does not fetch http://127.0.0.1:<port>/health")
        elif probe[1] != port or probe[2] not in READY_PATHS[comp]:
            p.append(f"{name}: healthcheck fetches :{probe[1]}{probe[2]}, the process serves "
                     f"{sorted(READY_PATHS[comp])} on {port_var}={port}")
        grace = _seconds(svc.get("stop_grace_period", "10s"))
        if grace * 1000 <= int(cfg.effective(env, "SHUTDOWN_GRACE_MS")):
            p.append(f"{name}: stop_grace_period {grace}s does not exceed SHUTDOWN_GRACE_MS: no time to drain")
        if comp == "gateway":
            if cfg.effective(env, "HOST") not in ("0.0.0.0", "::"):
                p.append(f"{name}: HOST={cfg.effective(env, 'HOST')!r}: unreachable from other containers")
            published = [str(x).rsplit(":", 1)[-1].split("/")[0] for x in svc.get("ports") or []]
            if str(port) not in published:
                p.append(f"{name}: ports {svc.get('ports')} do not publish the container port PORT={port}")
            if svc.get("profiles"):
                p.append(f"{name}: the gateway must run in every profile")
    p += _check_profiles(services, cfgs)
    return p


def _check_profiles(services: dict[str, dict], cfgs: dict[str, ConfigInfo]) -> list[str]:
    p = []
    gateways = [s for s in services.values() if service_component(s) == "gateway"]
    default_model = cfgs["gateway"].effective(service_env(gateways[0]), "DEFAULT_MODEL") if gateways else None
    for profile, image in (("cpu", "llm-worker-cpu"), ("gpu", "llm-worker-cuda")):
        ws = [(n, s) for n, s in services.items() if profile in (s.get("profiles") or [])]
        if not ws:
            p.append(f"no service in profile {profile!r}")
            continue
        for n, s in ws:
            env = service_env(s)
            if not str(s.get("image", "")).startswith(image + ":"):
                p.append(f"{n}: profile {profile} runs {s.get('image')}, expected {image}")
            model_id = cfgs["worker"].effective(env, "MODEL_ID")
            if model_id != default_model:
                p.append(f"{n}: MODEL_ID={model_id!r} but the gateway's DEFAULT_MODEL is {default_model!r}")
            if profile == "cpu" and cfgs["worker"].effective(env, "MODEL") != "bundled":
                p.append(f"{n}: the cpu profile must run the bundled model out of the box")
            devices = (((s.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
            has_gpu = any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices)
            if profile == "gpu" and not has_gpu:
                p.append(f"{n}: the gpu profile has no NVIDIA device reservation")
            if profile == "cpu" and has_gpu:
                p.append(f"{n}: the cpu profile reserves a GPU")
    return p


def _check_env_example(doc: dict, env_example: dict[str, str]) -> list[str]:
    used = variables_used(doc)
    p = [f".env.example does not list {v}, which docker-compose.yml uses" for v in sorted(used - set(env_example))]
    unused = set(env_example) - used - {"COMPOSE_PROFILES"}
    p += [f".env.example lists {v}, which docker-compose.yml never uses" for v in sorted(unused)]
    return p


def _seconds(text: Any) -> float:
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(text)):
        total += float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total
