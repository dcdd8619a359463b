"""``python -m llm_worker``: config → logging → model → engine → warm-up → register → serve until SIGTERM.

Exit status: 0 after a clean shutdown, 2 for a bad configuration or model source, 1 for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

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
                           kv_token_budget=kv_budget, prefill_chunk_tokens=cfg.prefill_chunk_tokens,
                           prefill_chunk_step_ratio=cfg.prefill_chunk_step_ratio,
                           cuda_allow_any_transformers=cfg.cuda_patches_allow_any_transformers,
                           cuda_structured_outputs=cfg.cuda_structured_outputs)
    engine.start()
    log.info("model loaded", extra={"model": loaded.model_id, "device": loaded.device, "dtype": loaded.dtype,
                                    "engine": name, "contextLength": loaded.context_length,
                                    "loadSeconds": round(loaded.load_seconds, 1),
                                    "stopTokenIds": sorted(loaded.eos_token_ids), "kvTokenBudget": kv_budget})
    model_mod.warm_up(engine, loaded.tokenizer)
    grammars = _background_grammar_compiler(cfg, loaded, name)
    export = model_mod.export_tokenizer(loaded.tokenizer)
    info = make_worker_info(worker_id=cfg.worker_id, model_id=loaded.model_id, queue=queue_name(loaded.model_id),
                            context_length=loaded.context_length, max_batch=cfg.max_batch, device=loaded.device,
                            dtype=loaded.dtype, engine=name, tokenizer_hash=export[2], version=__version__,
                            kv_token_budget=kv_budget)
    ctx = JobContext(engine=engine, tokenizer=loaded.tokenizer, logprob_formatter=LogprobFormatter(loaded.tokenizer),
                     worker_id=cfg.worker_id, context_length=loaded.context_length,
                     vocab_size=int(loaded.model.config.vocab_size), default_max_tokens=cfg.default_max_tokens,
                     flush_ms=cfg.stream_flush_ms, log_prompts=cfg.log_prompts, grammars=grammars,
                     grammar_timeout_s=cfg.grammar_compile_timeout_ms / 1000)
    try:
        asyncio.run(WorkerService(cfg, ctx, info, export, metrics).run_until_signal())
    finally:
        engine.stop()
    log.info("worker stopped")


def _background_grammar_compiler(cfg: Config, loaded, engine_name: str):
    """The structured-output compiler for this model's vocabulary, built on a thread once the worker is READY (the
    service calls JobContext.after_ready); None for the stand-in engine, which has no model to constrain."""
    if engine_name == "standin":
        return None
    from .grammar import BackgroundGrammarCompiler

    return BackgroundGrammarCompiler(lambda: _grammar_compiler(cfg, loaded))


def _grammar_compiler(cfg: Config, loaded):
    """The compiler, warmed up; None (logged) when this tokenizer cannot be constrained."""
    from .grammar import GrammarCompiler, GrammarError

    started = time.monotonic()
    try:
        compiler = GrammarCompiler(loaded.tokenizer, int(loaded.model.config.vocab_size), sorted(loaded.eos_token_ids),
                                   cache_size=cfg.grammar_cache_size)
    except GrammarError as exc:  # requests with a response_format then get a 400 saying this worker cannot serve it
        log.warning("structured outputs unavailable", extra={"reason": str(exc)})
        return None
    seconds = compiler.warm_up()
    log.info("grammar compiler ready", extra={"tokenizerSeconds": round(compiler.tokenizer_seconds, 2),
                                              "warmUpSeconds": round(seconds, 2),
                                              "seconds": round(time.monotonic() - started, 2)})
    return compiler


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
