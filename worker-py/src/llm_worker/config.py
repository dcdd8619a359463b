"""The worker's whole configuration, parsed once from environment variables (README.md lists each with its default).

A bad value stops start-up with a message naming the variable and exit status 2; nothing else reads os.environ.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379"
    model: str = "bundled"
    model_id: Optional[str] = None  # served id; derived from MODEL when unset (see model.resolve_source)
    gguf_file: Optional[str] = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    device_map: Optional[str] = None  # "auto" on cuda when unset
    trust_remote_code: bool = False
    # "standin": the benchmark stand-in (engine/standin.py: no model, fixed-rate tokens) — bench/cpu only.
    engine: Literal["auto", "cpu-batch", "cuda-cb", "standin"] = "auto"
    max_batch: int = Field(16, ge=1, le=1024)
    context_length: Optional[int] = Field(None, ge=16)
    default_max_tokens: int = Field(512, ge=1)
    stream_flush_ms: int = Field(15, ge=0, le=1000)
    heartbeat_ms: int = Field(1000, ge=100)
    heartbeat_ttl_ms: int = Field(5000, ge=500)
    # A dead worker's job is re-queued within LOCK_DURATION_MS + STALLED_INTERVAL_MS (7.5 s): PROTOCOL.md, "Worker
    # death and retries", gives the reasoning and the measured times.
    lock_duration_ms: int = Field(5000, ge=1000)
    stalled_interval_ms: int = Field(2500, ge=500)
    shutdown_grace_ms: int = Field(30000, ge=0)
    metrics_port: int = Field(9101, ge=0, le=65535)
    # Loopback unless configured: /metrics and /health are for this machine's scraper and probes; the images set
    # 0.0.0.0 for themselves (a container's probes and Prometheus reach it from outside).
    metrics_host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False
    worker_id: str = ""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    num_threads: Optional[int] = Field(None, ge=1)
    # KV cache budget of the CPU engine (engine/kv.py, kv_token_budget): KV_CACHE_BYTES when set, else
    # KV_MEMORY_FRACTION of the memory still available after the weights are loaded.
    kv_cache_bytes: Optional[int] = Field(None, ge=1)
    kv_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    # CPU engine (engine/prefill.py): a prompt longer than this is prefilled this many tokens per engine step, between
    # the running streams' decode steps, so they do not stall behind it; 0 = off (a prompt in one pass).
    prefill_chunk_tokens: int = Field(256, ge=0)
    # Beside decoding streams a chunk is sized so that it takes at most this many decode steps' time (measured by the
    # engine as it runs: engine/prefill.py ChunkSizer), at most PREFILL_CHUNK_TOKENS; 0 = fixed chunks of that size.
    prefill_chunk_step_ratio: float = Field(0.0, ge=0)  # 0.8 is the intended value once measured (issue 14)
    # Structured outputs (grammar.py): a response_format whose grammar takes longer to compile is refused with a 400;
    # compiled grammars are kept in an LRU of this many entries.
    grammar_compile_timeout_ms: int = Field(5000, ge=10)
    # A GGUF model's dequantised weights are kept here for the next start (weights_cache.py); "off" disables it.
    # Default: $XDG_CACHE_HOME/llm-worker/converted (~/.cache/...).
    weights_cache_dir: Optional[str] = None
    grammar_cache_size: int = Field(256, ge=1)
    # cuda-cb engine (engine/cuda/patches.py): it patches private internals of the pinned Transformers and refuses to
    # start on a version outside patches.SUPPORTED_TRANSFORMERS unless this is set (then it warns and goes on).
    cuda_patches_allow_any_transformers: bool = False
    # cuda-cb engine: serve response_format / forced tool calls (engine/cuda/constrained.py); they need the manager's
    # synchronous batching, so false is the way to get async batching back (and such requests are refused with a 400).
    cuda_structured_outputs: bool = True

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.heartbeat_ttl_ms <= self.heartbeat_ms:
            raise ValueError("HEARTBEAT_TTL_MS must be larger than HEARTBEAT_MS")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
            raise ValueError("REDIS_URL must start with redis://, rediss://, unix:// or (Redis Cluster) redis+cluster://")
        return self


def default_worker_id() -> str:
    return f"w-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def load_config(env: Optional[dict[str, str]] = None) -> Config:
    """Parse the environment; raises pydantic ValidationError on a bad value."""
    env = dict(os.environ if env is None else env)
    values: dict[str, str] = {}
    for name in Config.model_fields:
        raw = env.get(name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    cfg = Config(**values)
    if not cfg.worker_id:
        cfg = cfg.model_copy(update={"worker_id": default_worker_id()})
    return cfg


def load_config_or_exit() -> Config:
    try:
        return load_config()
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p).upper() for p in err["loc"]) or "config"
            print(f"llm_worker: bad configuration: {where}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        sys.exit(2)
