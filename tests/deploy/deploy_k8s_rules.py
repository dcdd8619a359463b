"""Cross-checks between rendered objects: autoscaling, disruption budgets, Redis, network policies, monitoring, ingress."""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import urlparse

from deploy_configs import ConfigInfo
from deploy_k8s_objects import by_kind, containers, find, has_port, matches, pod_labels, selected_workloads, workloads

COMPONENT_OF_CONTAINER = {"gateway": "gateway", "worker": "worker"}


def check_autoscaling(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
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
                p += check_model_label(where, m["external"]["metric"].get("selector", {}).get("matchLabels", {})
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
                p += check_model_label(where, model.group(1) if model else None, envs, cfgs)
    p += [f"{name}: scaled by more than one autoscaler: {ws}" for name, ws in targets.items() if len(ws) > 1]
    if find(objs, "Deployment", "llm-worker") and "llm-worker" not in targets:
        p.append("Deployment/llm-worker: nothing scales it on the queue")
    return p


def check_model_label(where: str, model: Optional[str], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    if "worker" not in envs:
        return []
    served = cfgs["worker"].effective({k: v or "" for k, v in envs["worker"].items()}, "MODEL_ID")
    if model != served:
        return [f"{where}: scales on the queue of model {model!r}, the worker serves {served!r}"]
    return []


def check_pdbs(objs: list[dict]) -> list[str]:
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


def _redis_nodes(url) -> list[tuple[str, int]]:
    """(host, port) of each node a REDIS_URL names: one for redis://, the comma-separated seeds of redis+cluster://
    (gateway/src/queue/redis.ts reads it the same way)."""
    if not url.scheme.endswith("+cluster"):
        return [(url.hostname or "", url.port or 6379)]
    nodes = []
    for hp in url.netloc.rpartition("@")[2].split(","):
        host, _, port = hp.rpartition(":") if ":" in hp else (hp, "", "")
        nodes.append((host.lower(), int(port) if port.isdigit() else 6379))
    return nodes


def check_redis(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
    p = []
    in_cluster = any("redis" in c["image"] for w in workloads(objs) for c in containers(w))
    for comp, env in envs.items():
        url = urlparse(cfgs[comp].effective({k: v or "" for k, v in env.items()}, "REDIS_URL") or "")
        if url.scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            p.append(f"{comp}: REDIS_URL {url.geturl()!r} is not a redis://, rediss:// or redis+cluster:// URL")
        for host, port in _redis_nodes(url):
            if not in_cluster:
                if "." not in host:
                    p.append(f"{comp}: no Redis in the cluster, and REDIS_URL host {host!r} is not a DNS name")
                continue
            svc = find(objs, "Service", host.split(".")[0])
            if svc is None:
                p.append(f"{comp}: REDIS_URL host {host!r} is not a Service of the stack")
            elif port not in [x["port"] for x in svc["spec"]["ports"]]:
                p.append(f"{comp}: REDIS_URL port {port} is not a port of Service/{svc['metadata']['name']}")
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


def policies_for(objs: list[dict], labels: dict) -> list[dict]:
    return [n for n in by_kind(objs, "NetworkPolicy")
            if "Ingress" in n["spec"].get("policyTypes", ["Ingress"]) and matches(n["spec"]["podSelector"], labels)
            or (n["spec"]["podSelector"] == {} and "Ingress" in n["spec"].get("policyTypes", ["Ingress"]))]


def check_network_policies(objs: list[dict]) -> list[str]:
    p = []
    redis = [w for w in workloads(objs) if any("redis" in c["image"] for c in containers(w))]
    clients = {w["metadata"]["name"] for w in workloads(objs)
               if any(c["name"] in COMPONENT_OF_CONTAINER for c in containers(w))}
    for r in redis:
        where = f"{r['kind']}/{r['metadata']['name']}"
        pols = policies_for(objs, pod_labels(r))
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
            pols = policies_for(objs, pod_labels(w))
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


def check_service_monitors(objs: list[dict]) -> list[str]:
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


def quantity_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", str(text).strip())
    if not m:
        return -1
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def check_ingress(objs: list[dict], envs: dict, cfgs: dict[str, ConfigInfo]) -> list[str]:
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
        body = quantity_bytes(ann.get("nginx.ingress.kubernetes.io/proxy-body-size", "1m"))
        max_body = int(cfgs["gateway"].effective(genv, "MAX_BODY_BYTES"))
        if body < max_body:
            p.append(f"{where}: proxy-body-size is below MAX_BODY_BYTES={max_body}")
    return p
