"""The config readers themselves: they must see every variable of the real configs, or the other checks mean little."""

from deploy_configs import REPO, parse_gateway_config, parse_worker_config


def test_gateway_config_is_read(configs):
    g = configs["gateway"]
    for name in ("PORT", "HOST", "REDIS_URL", "API_KEYS", "DEFAULT_MODEL", "SHUTDOWN_GRACE_MS", "LOG_LEVEL"):
        assert name in g.vars, f"{name} not found in gateway/src/config.ts: the reader no longer understands it"
    assert isinstance(g.vars["PORT"].default, int), "PORT's default was not read"
    assert g.vars["PORT"].kind == "int"


def test_worker_config_is_read(configs):
    w = configs["worker"]
    for name in ("REDIS_URL", "MODEL", "MODEL_ID", "DTYPE", "DEVICE", "DEVICE_MAP", "METRICS_PORT", "LOG_LEVEL"):
        assert name in w.vars, f"{name} not found in worker-py/src/llm_worker/config.py"
    assert isinstance(w.vars["METRICS_PORT"].default, int)
    assert w.vars["DTYPE"].kind == "choice" and "bfloat16" in w.vars["DTYPE"].choices


def test_readers_see_a_change(tmp_path):
    """Edit a copy of each config: a renamed variable and a new default must show up."""
    ts = (REPO / "gateway/src/config.ts").read_text()
    (tmp_path / "config.ts").write_text(ts.replace("PORT:", "LISTEN_PORT:", 1).replace(".default(8000)", ".default(8123)"))
    g = parse_gateway_config(tmp_path / "config.ts")
    assert "LISTEN_PORT" in g.vars and "PORT" not in g.vars
    assert g.vars["LISTEN_PORT"].default == 8123

    py = (REPO / "worker-py/src/llm_worker/config.py").read_text()
    (tmp_path / "config.py").write_text(py.replace("metrics_port:", "prom_port:", 1))
    w = parse_worker_config(tmp_path / "config.py")
    assert "PROM_PORT" in w.vars and "METRICS_PORT" not in w.vars


def test_values_are_checked_against_the_config(configs):
    w = configs["worker"]
    assert w.check_env({"DTYPE": "bfloat16", "MAX_BATCH": "16"}, "x") == []
    assert w.check_env({"DTYPE": "bf16"}, "x"), "a DTYPE outside the Literal must be refused"
    assert w.check_env({"MAX_BATCH": "0"}, "x"), "MAX_BATCH below its ge=1 must be refused"
    assert w.check_env({"NOT_A_SETTING": "1"}, "x"), "an unknown name must be refused"
    assert configs["gateway"].check_env({"LOG_LEVEL": "warning"}, "x"), "the gateway says warn, not warning"
