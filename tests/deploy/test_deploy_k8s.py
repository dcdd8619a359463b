"""k8s/: every overlay renders with kustomize, every object matches its schema, and the objects agree with each other
and with the code (selectors, ports, probes, env names and values, autoscaling, network policies, ingress)."""

import copy

import jsonschema
import pytest
import yaml

from deploy_configs import REPO
from deploy_render import OVERLAYS, render
from deploy_k8s import SCHEMA_FILES, check_objects, containers, find, schema_problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_match_their_schemas(rendered, overlay):
    kinds = {o["kind"] for o in rendered[overlay]}
    expected = {k for _, k in SCHEMA_FILES} - ({"PersistentVolumeClaim"} if overlay == "cpu" else set())
    assert expected <= kinds, f"missing kinds: {expected - kinds}"
    assert schema_problems(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_agree_with_each_other_and_the_code(rendered, configs, overlay):
    assert check_objects(rendered[overlay], configs) == []


def worker_container(objs):
    (c,) = containers(find(objs, "Deployment", "llm-worker"))
    return c


def test_gpu_overlay_requests_a_gpu_and_runs_the_cuda_image(rendered):
    c = worker_container(rendered["gpu"])
    assert c["resources"]["limits"].get("nvidia.com/gpu") == 1
    assert c["image"].startswith("llm-worker-cuda:")
    cm = next(o for o in rendered["gpu"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llm-worker-config"))
    assert cm["data"]["DTYPE"] == "bfloat16" and cm["data"]["DEVICE_MAP"] == "auto" and cm["data"]["DEVICE"] == "cuda"


def test_cpu_overlay_runs_the_bundled_model_without_a_gpu(rendered):
    c = worker_container(rendered["cpu"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["image"].startswith("llm-worker-cpu:")
    cm = next(o for o in rendered["cpu"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llm-worker-config"))
    assert cm["data"]["MODEL"] == "bundled"


def test_without_keda_the_hpa_component_scales_the_workers(configs, scratch_kustomization):
    """The documented alternative for clusters without KEDA renders and passes the same checks."""
    d = scratch_kustomization({"kustomization.yaml": yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "llm",
        "resources": ["../../../k8s/overlays/cpu/../../base"],
        "components": ["../../../k8s/components/worker-hpa", "../../../k8s/components/monitoring"],
        "images": [{"name": "llm-worker-cpu", "newTag": "0.1.0"}],
    })})
    objs = render(d)
    assert not any(o["kind"] == "ScaledObject" for o in objs)
    assert schema_problems(objs) == []
    assert check_objects(objs, configs) == []


def test_managed_redis_variant(configs, scratch_kustomization):
    """docs/DEPLOY.md's managed-Redis overlay: no in-cluster Redis, REDIS_URL pointing outside."""
    d = scratch_kustomization({
        "kustomization.yaml": (REPO / "docs/DEPLOY.md").read_text().split("<!-- managed-redis-kustomization -->")[1]
        .split("```yaml")[1].split("```")[0].replace("../../", "../../../k8s/"),
    })
    objs = render(d)
    assert not any(o["kind"] == "StatefulSet" for o in objs)
    assert schema_problems(objs) == []
    assert check_objects(objs, configs) == []


def test_managed_redis_cluster_variant(configs, scratch_kustomization):
    """The same overlay with a managed Redis Cluster (docs/DEPLOY.md, Redis Cluster): a redis+cluster:// URL of seeds
    passes; a seed that is not a DNS name is refused (the check reads every seed, not only the first)."""
    managed = (REPO / "docs/DEPLOY.md").read_text().split("<!-- managed-redis-kustomization -->")[1] \
        .split("```yaml")[1].split("```")[0].replace("../../", "../../../k8s/")
    seeds = "rediss+cluster://default:CHANGE-ME@node-1.my-redis.example.com:6380,node-2.my-redis.example.com:6380"
    assert "rediss://default:CHANGE-ME@my-redis.example.com:6380" in managed
    objs = render(scratch_kustomization({"kustomization.yaml": managed.replace(
        "rediss://default:CHANGE-ME@my-redis.example.com:6380", seeds)}))
    assert check_objects(objs, configs) == []
    objs = render(scratch_kustomization({"kustomization.yaml": managed.replace(
        "rediss://default:CHANGE-ME@my-redis.example.com:6380", seeds + ",redis-2:6380")}))
    assert any("'redis-2' is not a DNS name" in p for p in check_objects(objs, configs))


# --- the checks must be able to fail: deliberately broken copies ------------------------------------------------------

def _gw(objs):
    return find(objs, "Deployment", "llm-gateway")


def _gw_c(objs):
    return containers(_gw(objs))[0]


def _so_query(objs, q):
    find(objs, "ScaledObject", "llm-worker")["spec"]["triggers"][0]["metadata"]["query"] = q


def _redis_from_anywhere(objs):
    find(objs, "NetworkPolicy", "redis-from-gateway-and-workers")["spec"]["ingress"][0]["from"].append(
        {"namespaceSelector": {}})


def _cm(objs, prefix):
    return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix))


BROKEN = {
    "Service targetPort that no container opens": (
        lambda o: find(o, "Service", "llm-gateway")["spec"]["ports"][0].update(targetPort="htp"), "targetPort"),
    "Service selector matching nothing": (
        lambda o: find(o, "Service", "llm-worker-metrics")["spec"]["selector"].update({"app.kubernetes.io/name": "x"}),
        "matches no pod"),
    "Deployment selector not matching its pods": (
        lambda o: _gw(o)["spec"]["selector"]["matchLabels"].update(tier="api"), "does not match its pod labels"),
    "probe on a port not opened": (
        lambda o: worker_container(o)["readinessProbe"]["httpGet"].update(port=9102), "does not open"),
    "liveness that depends on Redis and workers": (
        lambda o: _gw_c(o)["livenessProbe"]["httpGet"].update(path="/ready"), "livenessProbe GETs /ready"),
    "env name no config defines": (
        lambda o: worker_container(o)["env"].append({"name": "MODEL_PATH", "value": "/m"}), "does not define"),
    "ConfigMap value the config refuses": (lambda o: _cm(o, "llm-worker-config")["data"].update(DEVICE="gpu"), "DEVICE"),
    "secretKeyRef to a missing key": (
        lambda o: _gw_c(o)["env"][0]["valueFrom"]["secretKeyRef"].update(key="APIKEYS"), "does not exist"),
    "gateway PORT moved, containerPort not": (lambda o: _cm(o, "llm-gateway-config")["data"].update(PORT="8080"), "PORT=8080"),
    "REDIS_URL to a Service that does not exist": (
        lambda o: find(o, "Secret", "llm-secrets")["stringData"].update(REDIS_URL="redis://valkey:6379"), "REDIS_URL"),
    "Redis open to every namespace": (_redis_from_anywhere, "reach Redis"),
    "queue query without prioritized jobs": (
        lambda o: _so_query(o, 'sum(max by (state) (llm_queue_jobs{namespace="llm", model="smollm2-135m-instruct", '
                               'state="waiting"}))'), "prioritized"),
    "queue query on another model": (
        lambda o: _so_query(o, 'sum(max by (state) (llm_queue_jobs{namespace="llm", model="m", '
                               'state=~"waiting|prioritized"}))'), "model 'm'"),
    "models disagree": (lambda o: _cm(o, "llm-gateway-config")["data"].update(DEFAULT_MODEL="x"), "DEFAULT_MODEL"),
    "grace period shorter than the drain": (
        lambda o: _gw(o)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=10), "terminationGrace"),
    "ingress buffering SSE": (
        lambda o: find(o, "Ingress", "llm-gateway")["metadata"]["annotations"].pop(
            "nginx.ingress.kubernetes.io/proxy-buffering"), "buffering"),
    "ServiceMonitor on a port name the Service lacks": (
        lambda o: find(o, "ServiceMonitor", "llm-worker")["spec"]["endpoints"][0].update(port="prom"), "'prom'"),
    "Redis without noeviction": (
        lambda o: containers(find(o, "StatefulSet", "redis"))[0]["args"].remove("noeviction"), "noeviction"),
    "PDB that blocks drains": (
        lambda o: find(o, "PodDisruptionBudget", "llm-gateway")["spec"].update(minAvailable=2), "drains"),
    "replicas fighting the HPA": (lambda o: _gw(o)["spec"].update(replicas=3), "owns it"),
    "object outside the namespace": (
        lambda o: find(o, "Ingress", "llm-gateway")["metadata"].update(namespace="default"), "namespace"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_objects_are_rejected(rendered, configs, case):
    edit, expected = BROKEN[case]
    objs = copy.deepcopy(rendered["cpu"])
    edit(objs)
    problems = check_objects(objs, configs)
    assert any(expected in p for p in problems), f"{case}: not caught; problems were {problems}"


def test_schema_rejects_misspelt_fields(rendered):
    objs = copy.deepcopy(rendered["gpu"])
    _gw(objs)["spec"]["replica"] = 2
    find(objs, "ScaledObject", "llm-worker")["spec"]["minReplicas"] = 1
    worker_container(objs)["resources"]["limits"]["nvidia.com/gpu"] = {"count": 1}
    problems = schema_problems(objs)
    assert any("'replica' was unexpected" in p for p in problems)
    assert any("'minReplicas' was unexpected" in p for p in problems)
    assert any("nvidia.com/gpu" in p for p in problems)


def test_a_broken_overlay_is_rejected_end_to_end(configs, scratch_kustomization):
    """An overlay whose patch moves the worker's container port renders fine; the checks catch it."""
    d = scratch_kustomization({"kustomization.yaml": yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../../k8s/overlays/cpu"],
        "patches": [{"target": {"kind": "Deployment", "name": "llm-worker"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/spec/template/spec/containers/0/ports/0/containerPort", "value": 9200}])}],
    })})
    problems = check_objects(render(d), configs)
    assert any("METRICS_PORT=9101" in p for p in problems), problems


def test_crd_conversion_is_strict_where_the_api_server_prunes():
    """crd_to_jsonschema.py (which made the ScaledObject schema) closes objects unless the CRD keeps unknown fields."""
    from crd_to_jsonschema import convert

    schema = convert({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"n": {"type": "integer", "format": "int32"}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "q": {"x-kubernetes-int-or-string": True},
    }})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"spec": {"n": 1}, "free": {"a": "x", "b": 2}, "q": "1Gi"})
    assert not v.is_valid({"spec": {"n": 1, "m": 2}})
    assert not v.is_valid({"q": [1]})
