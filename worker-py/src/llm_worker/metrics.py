"""The worker's Prometheus metrics (METRICS_PORT, 0 = off). Small on purpose: what shows batching and cancellation."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self._last_tokens = 0

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)

    def update(self, s: EngineStats) -> None:
        self.running.set(s.running_sequences)
        self.waiting.set(s.waiting_requests)
        self.batch.set(s.batch_size_last_step)
        self.kv_bytes.set(s.kv_cache_bytes)
        if s.generated_tokens_total > self._last_tokens:
            self.tokens.inc(s.generated_tokens_total - self._last_tokens)
            self._last_tokens = s.generated_tokens_total
