"""Rendered Kubernetes objects: schema validation, and the cross-checks that per-object schemas cannot make."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema

from deploy_configs import ConfigInfo
from deploy_k8s_objects import (  # noqa: F401 (find, containers: used by the tests through this module)
    by_kind, container_env, containers, find, has_port, matches, pod_labels, probes, selected_workloads, workloads,
)
from deploy_k8s_rules import (
    COMPONENT_OF_CONTAINER, check_autoscaling, check_ingress, check_network_policies, check_pdbs, check_redis,
    check_service_monitors,
)

SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCHEMA_FILES = {
    ("v1", "Namespace"): "k8s/namespace-v1.json",
    ("v1", "ConfigMap"): "k8s/configmap-v1.json",
    ("v1", "Secret"): "k8s/secret-v1.json",
    ("v1", "Service"): "k8s/service-v1.json",
    ("v1", "PersistentVolumeClaim"): "k8s/persistentvolumeclaim-v1.json",
    ("apps/v1", "Deployment"): "k8s/deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "k8s/statefulset-apps-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "k8s/horizontalpodautoscaler-autoscaling-v2.json",
    ("policy/v1", "PodDisruptionBudget"): "k8s/poddisruptionbudget-policy-v1.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "k8s/networkpolicy-networking-v1.json",
    ("networking.k8s.io/v1", "Ingress"): "k8s/ingress-networking-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "k8s/servicemonitor-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "crd/scaledobject-keda-v1alpha1.json",
}
NAMESPACE = "llm"
# Paths the code serves (tests/deploy/test_deploy_code_contract.py checks the sources): readiness may use either; liveness
# must use the one that depends on nothing outside the process.
READY_PATHS = {"gateway": {"/ready", "/health"}, "worker": {"/health"}}
LIVE_PATHS = {"gateway": {"/health"}, "worker": {"/metrics"}}


@lru_cache(maxsize=None)
def _validator(rel: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / rel).read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def schema_problems(objs: list[dict]) -> list[str]:
    p = []
    for o in objs:
        key = (o.get("apiVersion"), o.get("kind"))
        where = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if key not in SCHEMA_FILES:
            p.append(f"{where}: no schema for {key} in tests/deploy/schemas")
            continue
        for err in sorted(_validator(SCHEMA_FILES[key]).iter_errors(o), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(x) for x in err.absolute_path)
            p.append(f"{where}: {path}: {err.message[:200]}")
    return p


# --- cross-checks -----------------------------------------------------------------------------------------------------

def check_objects(objs: list[dict], cfgs: dict[str, ConfigInfo]) -> list[str]:
    p: list[str] = []
    p += _check_namespaces(objs)
    envs: dict[str, dict] = {}
    for w in workloads(objs):
        where = f"{w['kind']}/{w['metadata']['name']}"
        if not matches(w["spec"]["selector"], pod_labels(w)):
            p.append(f"{where}: selector {w['spec']['selector']} does not match its pod labels {pod_labels(w)}")
        for c in containers(w):
            cw = f"{where} container {c['name']}"
            names = [x.get("name") for x in c.get("ports") or [] if x.get("name")]
            if len(names) != len(set(names)):
                p.append(f"{cw}: port names repeat: {names}")
            for kind, probe in probes(c):
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action in probe and not has_port(c, probe[action]["port"]):
                        p.append(f"{cw}: {kind} uses port {probe[action]['port']!r}, which the container does not open")
            comp = COMPONENT_OF_CONTAINER.get(c["name"])
            env = container_env(objs, c, cw, p)
            if comp:
                p += cfgs[comp].check_env({k: v for k, v in env.items()}, cw)
                envs[comp] = env
                p += _check_component(w, c, env, cfgs[comp], comp)
    p += _check_services(objs)
    p += check_autoscaling(objs, envs, cfgs)
    p += check_pdbs(objs)
    p += check_redis(objs, envs, cfgs)
    p += check_network_policies(objs)
    p += check_service_monitors(objs)
    p += check_ingress(objs, envs, cfgs)
    if "gateway" in envs and "worker" in envs:
        dm = cfgs["gateway"].effective(envs["gateway"], "DEFAULT_MODEL")
        mid = cfgs["worker"].effective(envs["worker"], "MODEL_ID")
        if dm != mid:
            p.append(f"gateway DEFAULT_MODEL={dm!r} but the worker serves MODEL_ID={mid!r}")
    return p


def _check_namespaces(objs: list[dict]) -> list[str]:
    p = []
    if not find(objs, "Namespace", NAMESPACE):
        p.append(f"no Namespace {NAMESPACE}")
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE:
            p.append(f"{o['kind']}/{o['metadata']['name']}: namespace {o['metadata'].get('namespace')!r}, not {NAMESPACE}")
    return p


def _check_component(w: dict, c: dict, env: dict, cfg: ConfigInfo, comp: str) -> list[str]:
    p = []
    where = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
    port_var = "PORT" if comp == "gateway" else "METRICS_PORT"
    port = int(cfg.effective({k: v or "" for k, v in env.items()}, port_var))
    if not has_port(c, port):
        p.append(f"{where}: {port_var}={port} but the container opens {[x['containerPort'] for x in c.get('ports') or []]}")
    ready = c.get("readinessProbe", {}).get("httpGet")
    live = c.get("livenessProbe", {}).get("httpGet")
    if live and live.get("path") not in LIVE_PATHS[comp]:
        p.append(f"{where}: livenessProbe GETs {live.get('path')}, expected one of {sorted(LIVE_PATHS[comp])}")
    if not ready or ready.get("path") not in READY_PATHS[comp]:
        p.append(f"{where}: readinessProbe is not an HTTP GET of {sorted(READY_PATHS[comp])}")
    elif ready["port"] != port and not any(x.get("name") == ready["port"] and x["containerPort"] == port
                                          for x in c.get("ports") or []):
        p.append(f"{where}: readinessProbe port {ready['port']!r} is not {port_var}={port}")
    spec = w["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain_ms = int(cfg.effective({k: v or "" for k, v in env.items()}, "SHUTDOWN_GRACE_MS") or 0)
    if grace * 1000 <= drain_ms + pause * 1000:
        p.append(f"{where}: terminationGracePeriodSeconds {grace} leaves no time for SHUTDOWN_GRACE_MS={drain_ms}"
                 f" after a {pause}s preStop pause")
    if comp == "gateway" and cfg.effective({k: v or "" for k, v in env.items()}, "HOST") not in ("0.0.0.0", "::"):
        p.append(f"{where}: HOST is not 0.0.0.0: the gateway would listen on loopback only")
    sc = spec.get("securityContext", {})
    if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
        p.append(f"{where}: the pod does not run as a non-root numeric user")
    return p


def _check_services(objs: list[dict]) -> list[str]:
    p = []
    for s in by_kind(objs, "Service"):
        where = f"Service/{s['metadata']['name']}"
        ws = selected_workloads(objs, s["spec"].get("selector"))
        if not ws:
            p.append(f"{where}: selector {s['spec'].get('selector')} matches no pod template")
        for port in s["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for w in ws:
                if not any(has_port(c, target) for c in containers(w)):
                    p.append(f"{where}: targetPort {target!r} is not a port of {w['kind']}/{w['metadata']['name']}")
    return p


