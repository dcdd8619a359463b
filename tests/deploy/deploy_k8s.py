"""Rendered Kubernetes objects: schema validation, and the cross-checks that per-object schemas cannot make."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import jsonschema

from deploy_configs import ConfigInfo

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
COMPONENT_OF_CONTAINER = {"gateway": "gateway", "worker": "worker"}


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


# --- helpers ----------------------------------------------------------------------------------------------------------

def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def find(objs: list[dict], kind: str, name: str) -> Optional[dict]:
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(w: dict) -> dict:
    return w["spec"]["template"]["metadata"].get("labels") or {}


def matches(selector: Optional[dict], labels: dict) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a plain Service selector map."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
        for e in selector.get("matchExpressions") or []:
            v = labels.get(e["key"])
            op = e["operator"]
            ok &= {"In": v in e.get("values", []), "NotIn": v not in e.get("values", []),
                   "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[op]
        return ok
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(objs: list[dict], selector: Optional[dict]) -> list[dict]:
    return [w for w in workloads(objs) if matches(selector, pod_labels(w))]


def containers(w: dict) -> list[dict]:
    return w["spec"]["template"]["spec"]["containers"]


def has_port(container: dict, port: Any) -> bool:
    for cp in container.get("ports") or []:
        if port == cp.get("name") or (isinstance(port, int) and port == cp["containerPort"]):
            return True
    return False


def probes(c: dict) -> Iterator[tuple[str, dict]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in c:
            yield kind, c[kind]


def container_env(objs: list[dict], c: dict, where: str, problems: list[str]) -> dict[str, Optional[str]]:
    """Every env name the container gets, with its value where it is known (literal, ConfigMap, Secret)."""
    env: dict[str, Optional[str]] = {}
    for src in c.get("envFrom") or []:
        for ref_kind, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if ref_kind in src:
                o = find(objs, kind, src[ref_kind]["name"])
                if o is None:
                    problems.append(f"{where}: envFrom {kind} {src[ref_kind]['name']} does not exist")
                else:
                    env.update(data_of(o))
    for e in c.get("env") or []:
        value: Optional[str] = e.get("value")
        ref = (e.get("valueFrom") or {})
        for ref_kind, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if ref_kind in ref:
                o = find(objs, kind, ref[ref_kind]["name"])
                if o is None or ref[ref_kind]["key"] not in data_of(o):
                    problems.append(f"{where}: env {e['name']} refers to {kind} {ref[ref_kind]['name']} key "
                                    f"{ref[ref_kind]['key']}, which does not exist")
                else:
                    value = data_of(o)[ref[ref_kind]["key"]]
        env[e["name"]] = value
    return env


def data_of(o: dict) -> dict[str, str]:
    import base64

    out = {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()} if o["kind"] == "Secret" else dict(o.get("data") or {})
    out.update(o.get("stringData") or {})
    return out


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
    p += _check_autoscaling(objs, envs, cfgs)
    p += _check_pdbs(objs)
    p += _check_redis(objs, envs, cfgs)
    p += _check_network_policies(objs)
    p += _check_service_monitors(objs)
    p += _check_ingress(objs, envs, cfgs)
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
    if not ready or ready.get("path") != "/health":
        p.append(f"{where}: readinessProbe is not an HTTP GET of /health")
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


def _check_autoscaling(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    p = []
    targets: dict[str, list[str]] = {}
    for h in by_kind(objs, "HorizontalPodAutoscaler") + by_kind(objs, "ScaledObject"):
        ref = h["spec"]["scaleTargetRef"]
        where = f"{h['kind']}/{h['metadata']['name']}"
        w = find(objs, ref.get("kind", "Deployment"), ref["name"])
        if w is None:
            p.append(f"{where}: scale target {ref.get('kind')}/{ref['name']} does not exist")
            continue
        targets.setdefault(ref["name"], []).append(where)
        if "replicas" in w["spec"]:
            p.append(f"{w['kind']}/{ref['name']}: sets replicas although {where} owns it")
        for m in h["spec"].get("metrics", []):
            if m["type"] == "Resource":
                res = m["resource"]["name"]
                for c in containers(w):
                    if res not in (c.get("resources") or {}).get("requests", {}):
                        p.append(f"{where}: scales on {res} but container {c['name']} requests no {res}")
            if m["type"] == "External":
                p += _check_model_label(where, m["external"]["metric"].get("selector", {}).get("matchLabels", {})
                                        .get("model"), envs, cfgs)
        for t in h["spec"].get("triggers", []):
            if t["type"] == "prometheus":
                q = t["metadata"].get("query", "")
                if "llm_queue_jobs" not in q or not re.search(r"waiting", q) or not re.search(r"prioritized", q):
                    p.append(f"{where}: the query must count llm_queue_jobs in states waiting and prioritized: {q}")
                if not re.search(r"max\s+by\s*\(\s*state\s*\)", q):
                    p.append(f"{where}: every gateway reports the same queue depth: take max by (state) before sum")
                ns = re.search(r'namespace\s*=\s*"([^"]+)"', q)
                if ns and ns.group(1) != h["metadata"].get("namespace"):
                    p.append(f"{where}: the query reads namespace {ns.group(1)!r}, the stack runs in "
                             f"{h['metadata'].get('namespace')!r}")
                model = re.search(r'model\s*=\s*"([^"]+)"', q)
                p += _check_model_label(where, model.group(1) if model else None, envs, cfgs)
    p += [f"{name}: scaled by more than one autoscaler: {ws}" for name, ws in targets.items() if len(ws) > 1]
    if find(objs, "Deployment", "llm-worker") and "llm-worker" not in targets:
        p.append("Deployment/llm-worker: nothing scales it on the queue")
    return p


def _check_model_label(where: str, model: Optional[str], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    if "worker" not in envs:
        return []
    served = cfgs["worker"].effective({k: v or "" for k, v in envs["worker"].items()}, "MODEL_ID")
    if model != served:
        return [f"{where}: scales on the queue of model {model!r}, the worker serves {served!r}"]
    return []


def _check_pdbs(objs: list[dict]) -> list[str]:
    p = []
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        where = f"PodDisruptionBudget/{pdb['metadata']['name']}"
        ws = selected_workloads(objs, pdb["spec"]["selector"])
        if not ws:
            p.append(f"{where}: selector matches no pods")
        for w in ws:
            hpa = next((h for h in by_kind(objs, "HorizontalPodAutoscaler") + by_kind(objs, "ScaledObject")
                        if h["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]), None)
            floor = (hpa["spec"].get("minReplicas", hpa["spec"].get("minReplicaCount", 1)) if hpa
                     else w["spec"].get("replicas", 1))
            if isinstance(pdb["spec"].get("minAvailable"), int) and pdb["spec"]["minAvailable"] >= floor:
                p.append(f"{where}: minAvailable {pdb['spec']['minAvailable']} >= the {floor} replica(s) "
                         f"of {w['metadata']['name']}: node drains would block")
            if pdb["spec"].get("maxUnavailable") == 0:
                p.append(f"{where}: maxUnavailable 0 blocks every node drain")
    return p


def _check_redis(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    p = []
    in_cluster = any("redis" in c["image"] for w in workloads(objs) for c in containers(w))
    for comp, env in envs.items():
        url = urlparse(cfgs[comp].effective({k: v or "" for k, v in env.items()}, "REDIS_URL") or "")
        if url.scheme not in ("redis", "rediss"):
            p.append(f"{comp}: REDIS_URL {url.geturl()!r} is not a redis:// or rediss:// URL")
        if not in_cluster:
            if "." not in (url.hostname or ""):
                p.append(f"{comp}: no Redis in the cluster, and REDIS_URL host {url.hostname!r} is not a DNS name")
            continue
        svc = find(objs, "Service", (url.hostname or "").split(".")[0])
        if svc is None:
            p.append(f"{comp}: REDIS_URL host {url.hostname!r} is not a Service of the stack")
        elif (url.port or 6379) not in [x["port"] for x in svc["spec"]["ports"]]:
            p.append(f"{comp}: REDIS_URL port {url.port or 6379} is not a port of Service/{svc['metadata']['name']}")
    for sts in by_kind(objs, "StatefulSet"):
        where = f"StatefulSet/{sts['metadata']['name']}"
        gov = find(objs, "Service", sts["spec"].get("serviceName", ""))
        if gov is None or gov["spec"].get("clusterIP") != "None" or not matches(gov["spec"].get("selector"), pod_labels(sts)):
            p.append(f"{where}: serviceName {sts['spec'].get('serviceName')!r} is not a headless Service of its pods")
        mounts = {m["name"] for c in containers(sts) for m in c.get("volumeMounts") or []}
        for vct in sts["spec"].get("volumeClaimTemplates", []):
            if vct["metadata"]["name"] not in mounts:
                p.append(f"{where}: volumeClaimTemplate {vct['metadata']['name']} is never mounted")
        if any("redis" in c["image"] for c in containers(sts)):
            args = " ".join(a for c in containers(sts) for a in (c.get("command") or []) + (c.get("args") or []))
            if not re.search(r"--appendonly\s+yes", args):
                p.append(f"{where}: Redis without --appendonly yes loses queued jobs on restart")
            if not re.search(r"--maxmemory-policy\s+noeviction", args):
                p.append(f"{where}: Redis without --maxmemory-policy noeviction (BullMQ requires it)")
            if not sts["spec"].get("volumeClaimTemplates"):
                p.append(f"{where}: Redis data is not on a PersistentVolumeClaim")
    return p


def _policies_for(objs: list[dict], labels: dict) -> list[dict]:
    return [n for n in by_kind(objs, "NetworkPolicy")
            if "Ingress" in n["spec"].get("policyTypes", ["Ingress"]) and matches(n["spec"]["podSelector"], labels)
            or (n["spec"]["podSelector"] == {} and "Ingress" in n["spec"].get("policyTypes", ["Ingress"]))]


def _check_network_policies(objs: list[dict]) -> list[str]:
    p = []
    redis = [w for w in workloads(objs) if any("redis" in c["image"] for c in containers(w))]
    clients = {w["metadata"]["name"] for w in workloads(objs)
               if any(c["name"] in COMPONENT_OF_CONTAINER for c in containers(w))}
    for r in redis:
        where = f"{r['kind']}/{r['metadata']['name']}"
        pols = _policies_for(objs, pod_labels(r))
        if not pols:
            p.append(f"{where}: no NetworkPolicy selects the Redis pods: every pod in the cluster can reach Redis")
        reached: set[str] = set()
        for n in pols:
            for rule in n["spec"].get("ingress") or []:
                peers = rule.get("from")
                if not peers:
                    p.append(f"NetworkPolicy/{n['metadata']['name']}: lets any source reach Redis")
                    continue
                for peer in peers:
                    if "ipBlock" in peer or "namespaceSelector" in peer or "podSelector" not in peer:
                        p.append(f"NetworkPolicy/{n['metadata']['name']}: lets {peer} reach Redis")
                        continue
                    reached |= {w["metadata"]["name"] for w in selected_workloads(objs, peer["podSelector"])}
                for port in rule.get("ports") or []:
                    if not any(has_port(c, port.get("port")) for c in containers(r)):
                        p.append(f"NetworkPolicy/{n['metadata']['name']}: port {port.get('port')} is not a Redis port")
        if reached != clients:
            p.append(f"{where}: reachable from {sorted(reached)}, expected exactly the gateway and workers {sorted(clients)}")
    for n in by_kind(objs, "NetworkPolicy"):
        if n["spec"]["podSelector"] and not selected_workloads(objs, n["spec"]["podSelector"]):
            p.append(f"NetworkPolicy/{n['metadata']['name']}: selects no pods")
    # Every port a Service exposes must be let in by some policy, or a default deny would cut it off.
    for s in by_kind(objs, "Service"):
        for w in selected_workloads(objs, s["spec"].get("selector")):
            pols = _policies_for(objs, pod_labels(w))
            if not pols:
                continue
            for port in s["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                numbers = {cp["containerPort"] for c in containers(w) for cp in c.get("ports") or []
                           if target in (cp.get("name"), cp["containerPort"])}
                allowed = any(not rule.get("ports") or any(x.get("port") in numbers | {target} for x in rule["ports"])
                              for n in pols for rule in n["spec"].get("ingress") or [])
                if not allowed:
                    p.append(f"Service/{s['metadata']['name']}: no NetworkPolicy admits port {target!r} "
                             f"of {w['metadata']['name']}")
    return p


def _check_service_monitors(objs: list[dict]) -> list[str]:
    p = []
    for sm in by_kind(objs, "ServiceMonitor"):
        where = f"ServiceMonitor/{sm['metadata']['name']}"
        svcs = [s for s in by_kind(objs, "Service") if matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not svcs:
            p.append(f"{where}: selects no Service")
        for ep in sm["spec"].get("endpoints", []):
            for s in svcs:
                if ep.get("port") not in [x.get("name") for x in s["spec"]["ports"]]:
                    p.append(f"{where}: endpoint port {ep.get('port')!r} is not a named port of Service/{s['metadata']['name']}")
            if ep.get("path", "/metrics") != "/metrics":
                p.append(f"{where}: scrapes {ep.get('path')}, the stack serves /metrics")
    return p


def _quantity_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", str(text).strip())
    if not m:
        return -1
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def _check_ingress(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    p = []
    genv = {k: v or "" for k, v in envs.get("gateway", {}).items()}
    for ing in by_kind(objs, "Ingress"):
        where = f"Ingress/{ing['metadata']['name']}"
        ann = ing["metadata"].get("annotations") or {}
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                b = path["backend"]["service"]
                svc = find(objs, "Service", b["name"])
                if svc is None:
                    p.append(f"{where}: backend Service {b['name']} does not exist")
                    continue
                port = b["port"].get("name", b["port"].get("number"))
                if port not in [x.get("name") for x in svc["spec"]["ports"]] + [x["port"] for x in svc["spec"]["ports"]]:
                    p.append(f"{where}: backend port {port!r} is not a port of Service/{b['name']}")
        if ann.get("nginx.ingress.kubernetes.io/proxy-buffering") != "off":
            p.append(f"{where}: proxy buffering is not off: SSE tokens would arrive in bursts")
        timeout_ms = int(cfgs["gateway"].effective(genv, "REQUEST_TIMEOUT_MS"))
        for a in ("proxy-read-timeout", "proxy-send-timeout"):
            v = ann.get(f"nginx.ingress.kubernetes.io/{a}", "60")
            if not v.isdigit() or int(v) * 1000 < timeout_ms:
                p.append(f"{where}: {a} {v}s is shorter than REQUEST_TIMEOUT_MS={timeout_ms}")
        body = _quantity_bytes(ann.get("nginx.ingress.kubernetes.io/proxy-body-size", "1m"))
        max_body = int(cfgs["gateway"].effective(genv, "MAX_BODY_BYTES"))
        if body < max_body:
            p.append(f"{where}: proxy-body-size is below MAX_BODY_BYTES={max_body}")
    return p
