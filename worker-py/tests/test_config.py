from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from llm_worker.config import load_config


def test_defaults():
    cfg = load_config({})
    assert cfg.redis_url == "redis://127.0.0.1:6379" and cfg.model == "bundled" and cfg.max_batch == 16
    assert cfg.stream_flush_ms == 15 and cfg.lock_duration_ms == 5000 and cfg.stalled_interval_ms == 2500
    assert cfg.metrics_port == 9101 and not cfg.log_prompts and cfg.worker_id.startswith("w-")


def test_env_values_are_parsed():
    cfg = load_config({"MAX_BATCH": "4", "TRUST_REMOTE_CODE": "true", "DTYPE": "bfloat16", "WORKER_ID": "w-x"})
    assert cfg.max_batch == 4 and cfg.trust_remote_code and cfg.dtype == "bfloat16" and cfg.worker_id == "w-x"


@pytest.mark.parametrize("env", [{"MAX_BATCH": "zero"}, {"DTYPE": "int3"}, {"HEARTBEAT_MS": "5000"},
                                 {"REDIS_URL": "localhost:6379"}, {"QUANTIZATION": "2bit"}])
def test_bad_values_raise(env):
    with pytest.raises(ValidationError):
        load_config(env)


def test_bad_value_exits_2_with_a_clear_message():
    # The timeout only bounds a hang: starting Python with the worker's imports is slow on a loaded machine.
    proc = subprocess.run([sys.executable, "-m", "llm_worker"], env={"MAX_BATCH": "-3", "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "MAX_BATCH" in proc.stderr


# --- QUANTIZATION (bitsandbytes, CUDA only) ---------------------------------------------------------------------------

def test_quantization_on_cpu_is_a_clear_config_error():
    from llm_worker import model as model_mod
    from llm_worker.errors import ConfigError

    with pytest.raises(ConfigError, match=r"QUANTIZATION=8bit needs DEVICE=cuda.*GGUF"):
        model_mod._quantization_config(load_config({"QUANTIZATION": "8bit"}), "cpu")


def test_quantization_without_bitsandbytes_is_a_clear_config_error():
    import importlib.util

    from llm_worker import model as model_mod
    from llm_worker.errors import ConfigError

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    # device="cuda" is only a string here: no GPU exists on this machine, and the check comes before any CUDA call.
    with pytest.raises(ConfigError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        model_mod._quantization_config(load_config({"QUANTIZATION": "4bit"}), "cuda")


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantization_builds_the_bitsandbytes_config(monkeypatch, mode):
    """Mocked (no GPU here): bitsandbytes "found", so the worker asks Transformers for 8- or 4-bit loading."""
    import importlib.util

    from llm_worker import model as model_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    q = model_mod._quantization_config(load_config({"QUANTIZATION": mode}), "cuda")
    assert (q.load_in_8bit, q.load_in_4bit) == (mode == "8bit", mode == "4bit")


def test_metrics_port_listens_on_loopback_unless_configured():
    from conftest import free_port
    from llm_worker.metrics import Metrics

    assert load_config({}).metrics_host == "127.0.0.1"
    server = Metrics().serve(free_port(), load_config({}).metrics_host)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    assert load_config({"METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"


def test_cluster_url_parts_shared_by_every_client():
    """Both cluster clients read REDIS_URL through one parser: seeds, a seed without a port (6379), credentials, TLS."""
    from llm_worker.transport.redis_client import _cluster_parts, cancel_listener_client

    assert _cluster_parts("rediss+cluster://u:p%40ss@a.example:7000,b.example") == (
        True, "u", "p@ss", [("a.example", 7000), ("b.example", 6379)])
    listener = cancel_listener_client("redis+cluster://seed-only", None)  # no port: 6379, as for the cluster client
    kw = listener.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"]) == ("seed-only", 6379)
    plain = object()
    assert cancel_listener_client("redis://127.0.0.1:6379", plain) is plain
