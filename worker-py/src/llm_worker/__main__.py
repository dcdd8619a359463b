"""``python -m llm_worker``: config → logging → model → engine → warm-up → register → serve until SIGTERM.

Exit status: 0 after a clean shutdown, 2 for a bad configuration or model source, 1 for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from . import __version__
from .config import Config, load_config_or_exit
from .errors import ConfigError
from .log import setup_logging

log = logging.getLogger("llm_worker")


def build_and_serve(cfg: Config) -> None:
    from . import model as model_mod
    from .engine import create_engine, engine_name
    from .metrics import Metrics
    from .protocol import queue_name
    from .text.logprobs import LogprobFormatter
    from .transport.job_run import JobContext
    from .transport.registry import make_worker_info
    from .transport.service import WorkerService

    metrics = Metrics()
    metrics.serve(cfg.metrics_port, cfg.metrics_host)
    if model_mod.resolve_device(cfg) == "cpu":
        model_mod.keep_main_thread_serial()
    loaded = model_mod.load(cfg)
    metrics.load_seconds.set(loaded.load_seconds)
    name = engine_name(cfg.engine, loaded.device)
    kv_budget = None
    if name == "cpu-batch":  # measured after the weights are loaded: the budget is what is left beside them
        from .engine.kv import kv_token_budget

        kv_budget = kv_token_budget(loaded.model, cache_bytes=cfg.kv_cache_bytes,
                                    memory_fraction=cfg.kv_memory_fraction)
    engine = create_engine(name, loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=cfg.max_batch,
                           context_length=loaded.context_length, num_threads=cfg.num_threads,
                           kv_token_budget=kv_budget)
    engine.start()
    log.info("model loaded", extra={"model": loaded.model_id, "device": loaded.device, "dtype": loaded.dtype,
                                    "engine": name, "contextLength": loaded.context_length,
                                    "loadSeconds": round(loaded.load_seconds, 1),
                                    "stopTokenIds": sorted(loaded.eos_token_ids), "kvTokenBudget": kv_budget})
    model_mod.warm_up(engine, loaded.tokenizer)
    export = model_mod.export_tokenizer(loaded.tokenizer)
    info = make_worker_info(worker_id=cfg.worker_id, model_id=loaded.model_id, queue=queue_name(loaded.model_id),
                            context_length=loaded.context_length, max_batch=cfg.max_batch, device=loaded.device,
                            dtype=loaded.dtype, engine=name, tokenizer_hash=export[2], version=__version__,
                            kv_token_budget=kv_budget)
    ctx = JobContext(engine=engine, tokenizer=loaded.tokenizer, logprob_formatter=LogprobFormatter(loaded.tokenizer),
                     worker_id=cfg.worker_id, context_length=loaded.context_length,
                     vocab_size=int(loaded.model.config.vocab_size), default_max_tokens=cfg.default_max_tokens,
                     flush_ms=cfg.stream_flush_ms, log_prompts=cfg.log_prompts)
    try:
        asyncio.run(WorkerService(cfg, ctx, info, export, metrics).run_until_signal())
    finally:
        engine.stop()
    log.info("worker stopped")


def main() -> None:
    cfg = load_config_or_exit()
    setup_logging(cfg.log_level)
    try:
        build_and_serve(cfg)
    except ConfigError as exc:
        log.error(str(exc))
        sys.exit(2)
    except Exception:
        log.exception("worker failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
