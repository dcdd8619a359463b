"""docker-compose.yml against the compose-spec schema, the configs, the Dockerfiles and .env.example."""

import copy
import json

import jsonschema
import pytest
import yaml

from deploy_compose import check_compose, interpolate, read_env_file
from deploy_configs import REPO

SCHEMA = json.loads((REPO / "tests/deploy/schemas/compose-spec.json").read_text())


def compose_raw() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def env_example() -> dict:
    return read_env_file((REPO / ".env.example").read_text())


def schema_errors(doc: dict) -> list[str]:
    v = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in v.iter_errors(doc)]


# Each environment Compose may run with: the example .env, and no .env at all (defaults only).
ENVS = {"with .env.example": env_example, "without .env": dict}


def test_compose_file_matches_the_schema():
    assert schema_errors(compose_raw()) == []


@pytest.mark.parametrize("env_name", ENVS)
def test_interpolated_compose_matches_the_schema(env_name):
    assert schema_errors(interpolate(compose_raw(), ENVS[env_name]())) == []


@pytest.mark.parametrize("env_name", ENVS)
def test_compose_agrees_with_code_and_configs(configs, env_name):
    assert check_compose(compose_raw(), configs, env_example(), ENVS[env_name]()) == []


# --- the checks must be able to fail: deliberately broken copies ------------------------------------------------------

def broken(edit) -> dict:
    doc = copy.deepcopy(compose_raw())
    edit(doc)
    return doc


def _rename_redis(d):
    d["services"]["cache"] = d["services"].pop("redis")


def _worker_env(d, key, value):
    d["services"]["worker-cpu"]["environment"][key] = value


BROKEN = {
    "unknown env name": (lambda d: _worker_env(d, "MODEL_PATH", "/x"), "does not define"),
    "gateway-only env on the worker": (lambda d: _worker_env(d, "API_KEYS", "k"), "API_KEYS"),
    "value the config refuses": (lambda d: _worker_env(d, "DTYPE", "bf16"), "DTYPE"),
    "Redis renamed, REDIS_URL not": (_rename_redis, "REDIS_URL points at redis"),
    "healthcheck on the wrong port": (
        lambda d: d["services"]["gateway"]["healthcheck"].update(
            test=["CMD", "node", "-e", "fetch('http://127.0.0.1:8080/ready')"]), "healthcheck fetches :8080"),
    "healthcheck on a path the code does not serve": (
        lambda d: d["services"]["worker-cpu"]["healthcheck"].update(
            test=["CMD", "python", "-c", "u.urlopen('http://127.0.0.1:9101/healthz')"]), "fetches :9101/healthz"),
    "metrics port moved, healthcheck not": (lambda d: _worker_env(d, "METRICS_PORT", "9200"), "METRICS_PORT=9200"),
    "gateway listening on loopback": (lambda d: d["services"]["gateway"]["environment"].pop("HOST"), "HOST"),
    "no noeviction": (lambda d: d["services"]["redis"]["command"].remove("noeviction"), "noeviction"),
    "depends_on without health": (
        lambda d: d["services"]["gateway"].update(depends_on=["redis"]), "service_healthy"),
    "no GPU reservation": (lambda d: d["services"]["worker-gpu"].pop("deploy"), "NVIDIA device reservation"),
    "models disagree": (lambda d: _worker_env(d, "MODEL_ID", "other"), "DEFAULT_MODEL"),
    "variable missing from .env.example": (
        lambda d: d["services"]["redis"]["command"].append("${REDIS_EXTRA}"), ".env.example does not list"),
    "no drain time": (lambda d: d["services"]["worker-cpu"].update(stop_grace_period="5s"), "stop_grace_period"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_compose_is_rejected(configs, case):
    edit, expected = BROKEN[case]
    problems = check_compose(broken(edit), configs, env_example(), env_example())
    assert any(expected in p for p in problems), f"{case}: not caught; problems were {problems}"


def test_schema_rejects_a_misspelt_key():
    doc = broken(lambda d: d["services"]["gateway"].update(healthchek={"test": ["CMD", "true"]}))
    assert any("healthchek" in e for e in schema_errors(doc))
