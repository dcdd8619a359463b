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
    proc = subprocess.run([sys.executable, "-m", "llm_worker"], env={"MAX_BATCH": "-3", "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "MAX_BATCH" in proc.stderr
