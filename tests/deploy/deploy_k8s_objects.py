"""Reading rendered Kubernetes objects: lookups, label selectors, containers, ports and env."""

from __future__ import annotations

import base64
from typing import Any, Iterator, Optional

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
    out = {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()} if o["kind"] == "Secret" else dict(o.get("data") or {})
    out.update(o.get("stringData") or {})
    return out


