"""The worker's Prometheus metrics and health endpoint (METRICS_PORT, 0 = off).

``GET /metrics``: Prometheus text. ``GET /health``: 200 once the model is loaded and the worker is registered (until it
starts shutting down), else 503 — what the Kubernetes probes and compose healthchecks ask (see docs/DEPLOY.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine.base import EngineStats


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("llm_worker_running_sequences", "Sequences (choices) in the running batch", registry=r)
        self.waiting = Gauge("llm_worker_waiting_requests", "Requests submitted but not yet in the batch", registry=r)
        self.batch = Gauge("llm_worker_batch_size", "Rows in the last forward pass", registry=r)
        self.kv_bytes = Gauge("llm_worker_kv_cache_bytes", "Bytes held by the KV cache", registry=r)
        self.tokens = Counter("llm_worker_generated_tokens_total", "Tokens generated", registry=r)
        self.jobs = Counter("llm_worker_jobs_total", "Jobs finished, by outcome", ["outcome"], registry=r)
        self.gen_seconds = Histogram("llm_worker_generation_seconds", "Job pick-up to finish",
                                     buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160), registry=r)
        self.load_seconds = Gauge("llm_worker_model_load_seconds", "Model load time", registry=r)
        self.tokens_per_second = Gauge("llm_worker_tokens_per_second",
                                       "Tokens generated per second, over the last update interval", registry=r)
        self.memory = Gauge("llm_worker_memory_bytes", "Memory in use: process resident set (rss) and, on CUDA, "
                            "tensors allocated on the GPU (gpu_allocated)", ["kind"], registry=r)
        self._last_tokens = 0
        self._last_update = time.monotonic()
        self.ready = False  # set by the transport once registered, cleared when shutting down

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Starts the HTTP endpoint on a daemon thread; returns its server (None when the port is 0)."""
        if not port:
            return None
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
                elif path == "/health":
                    status = 200 if metrics.ready else 503
                    body = json.dumps({"status": "ready" if metrics.ready else "starting"}).encode()
                    self._send(status, "application/json", body)
                else:
                    self._send(404, "application/json", b'{"error": "not found"}')

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: keep them out of the logs
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            from .errors import ConfigError

            raise ConfigError(f"METRICS_HOST:METRICS_PORT {host}:{port} cannot be used ({exc.strerror}); set another port, or 0 to turn it off")
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server

    def update(self, s: EngineStats) -> None:
        self.running.set(s.running_sequences)
        self.waiting.set(s.waiting_requests)
        self.batch.set(s.batch_size_last_step)
        self.kv_bytes.set(s.kv_cache_bytes)
        now = time.monotonic()
        new_tokens = max(0, s.generated_tokens_total - self._last_tokens)
        if new_tokens:
            self.tokens.inc(new_tokens)
            self._last_tokens = s.generated_tokens_total
        if now > self._last_update:
            self.tokens_per_second.set(new_tokens / (now - self._last_update))
        self._last_update = now
        self.memory.labels("rss").set(_resident_bytes())
        if torch_cuda_available():
            import torch

            self.memory.labels("gpu_allocated").set(torch.cuda.memory_allocated())


def _resident_bytes() -> int:
    """The process's resident set size (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()
