"""What the deployment files assume of the code: the paths probes and scrapers fetch, and the metric autoscaling reads.

Read from the sources (no process started): the end-to-end suites exercise the same endpoints for real."""

import re
from pathlib import Path

from deploy_configs import REPO


def sources(folder: str, suffix: str) -> dict[Path, str]:
    root = REPO / folder
    return {p: p.read_text(encoding="utf-8") for p in sorted(root.rglob(f"*{suffix}")) if "node_modules" not in p.parts}


def serves(files: dict[Path, str], path: str) -> bool:
    return any(re.search(rf"""['"]{re.escape(path)}['"]""", text) for text in files.values())


def test_gateway_serves_health_ready_and_metrics():
    files = sources("gateway/src", ".ts")
    assert serves(files, "/health"), "no '/health' route in gateway/src: the image HEALTHCHECK and liveness use it"
    assert serves(files, "/ready"), "no '/ready' route in gateway/src: readiness and the compose healthcheck use it"
    assert serves(files, "/metrics"), "no '/metrics' route in gateway/src: the ServiceMonitor scrapes it on PORT"


def test_worker_serves_health_on_its_metrics_port():
    files = sources("worker-py/src/llm_worker", ".py")
    assert serves(files, "/health"), (
        "no '/health' in worker-py/src: the worker's readiness/startup probes and compose healthchecks GET "
        "http://<pod>:METRICS_PORT/health (200 once the model is loaded and the worker registered)")
    # prometheus_client's start_http_server listens on all interfaces unless told otherwise; loopback would be unreachable.
    assert not any(re.search(r"start_http_server\([^)]*(127\.0\.0\.1|localhost)", t) for t in files.values())


def test_gateway_exports_the_queue_depth_autoscaling_reads():
    files = {p: t for p, t in sources("gateway/src", ".ts").items() if "llm_queue_jobs" in t}
    assert files, "no llm_queue_jobs gauge in gateway/src: the KEDA trigger (k8s/components/keda) scales on it"
    text = "\n".join(files.values())
    for label in ("model", "state"):
        assert re.search(rf"""['"]{label}['"]""", text), f"llm_queue_jobs has no {label!r} label: the query selects on it"
    assert "prioritized" in text, "the gauge must report prioritized jobs (BullMQ keeps them outside the wait list)"
