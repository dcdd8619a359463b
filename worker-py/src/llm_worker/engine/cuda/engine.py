"""``CudaContinuousBatchingEngine``: Transformers' own continuous batching (paged KV cache, per-request sampling)
behind our ``Engine``.

The manager from ``model.init_continuous_batching`` owns the scheduler, the paged cache and a generation thread. This
engine adds what the worker needs around it: one CB request per choice (``n`` > 1 shares the prompt's full blocks
through the manager's prefix sharing), per-request sampling mapped onto the manager's per-request logits processors
(params.py), an emitter thread that coalesces every token available since the last pass into one ``emit`` per request,
cancellation and deadlines (``cancel_request`` frees the sequence's blocks at the next step), and a cache sized from
the memory actually free (Transformers' own sizing assumes a GPU and sizes for most of the host's RAM on CPU).

Attention (attention.py, kernels.py): ``paged|torch_flash_varlen`` on CUDA when its self-test passes, with a Triton
decode kernel for batches where every sequence adds one token; sampling work chosen per batch (patches.py).
Structured outputs (constrained.py): each constrained choice's CB request gets its own grammar matcher, registered
before the request is queued; the manager runs with synchronous batching so that every mask follows the request's
previous token, and a request whose grammar is complete is finished by the manager with its last token (reported as
"stop"). Every change inside the manager is in patches.py, which checks the installed Transformers version first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from ..base import ChoiceOutput, EmitFn, Engine, EngineStats, GenerationRequest, SamplingParams
from .attention import VARLEN_ATTN, register_varlen_attention, set_attention, use_decode_kernel
from .config import CudaCBConfig, async_batching, manager_config
from .constrained import ConstrainedRequest, GrammarTable
from .kernels import DECODE_KERNELS, decode_kernel_self_test, flash_varlen_self_test
from .params import check_params, processor_kwargs
from .patches import (
    check_transformers_version,
    create_batch_processor,
    enable_decode_fast_path,
    hook_fast_sampling,
    install_fast_sampling,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------- engine
_WAKE = object()  # put on the manager's output queue to wake the emitter (cancel, stop)


@dataclass
class _Choice:
    cb_id: str
    index: int
    sent: int = 0  # tokens already emitted
    done: bool = False
    grammar: Optional[ConstrainedRequest] = None  # its grammar state (structured outputs), read-only on this side


@dataclass
class _Request:
    request: GenerationRequest
    emit: EmitFn
    choices: list[_Choice]
    eos: frozenset[int]


def _finish_reason(generated: list[int], eos: frozenset[int], grammar: Optional[ConstrainedRequest]):
    """(finish_reason, error, ends with an EOS token) of a CB request the manager finished."""
    if generated and generated[-1] in eos:
        return "stop", None, True
    if grammar is not None and grammar.error is not None:
        logger.error("grammar matcher failed: %s", grammar.error)
        return "error", f"structured output: {grammar.error}", False
    if grammar is not None and grammar.finished:
        return "stop", None, False  # the grammar is complete; its last token is part of the text
    return "length", None, False


class CudaContinuousBatchingEngine(Engine):
    """``Engine`` over ``model.init_continuous_batching``. ``model`` is a loaded causal LM (CUDA or CPU)."""

    def __init__(self, model, config: Optional[CudaCBConfig] = None, eos_token_ids=None,
                 max_batch: Optional[int] = None, context_length: Optional[int] = None):
        """``eos_token_ids``: None = the model's generation config. ``max_batch`` caps the sequences per forward pass
        (the manager's max_requests_per_batch) unless the config sets it. ``context_length`` is informational: the
        transport enforces prompt + max_tokens <= context_length before submit."""
        self.model = model
        self.config = config or CudaCBConfig()
        async_batching(self.config, on_cuda=True)  # refuses async batching with structured outputs, before any work
        if max_batch is not None and self.config.max_requests_per_batch is None:
            self.config = replace(self.config, max_requests_per_batch=max_batch)
        self.context_length = context_length
        self.device = model.device
        self.vocab_size = model.config.get_text_config().vocab_size
        eos = eos_token_ids if eos_token_ids is not None else model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = frozenset(i for i in eos if i is not None and i >= 0)
        self.attn_implementation = self._choose_attention()
        self.decode_path: Optional[str] = None
        self.fast_sampling = False
        # None when grammars are not served; set up in start() (fast sampling carries the masks).
        self._grammars: Optional[GrammarTable] = None
        self.manager = None
        self._requests: dict[str, _Request] = {}
        self._by_cb_id: dict[str, tuple[_Request, _Choice]] = {}
        self._lock = threading.Lock()
        self._cancels: "queue.SimpleQueue[str]" = queue.SimpleQueue()  # request ids, handled on the emitter thread
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._generated_total = 0
        self.cache_info: dict[str, Any] = {}
        self.last_error: Optional[str] = None

    # ----------------------------------------------------------------------------------------------- start / stop
    def _choose_attention(self) -> str:
        wanted = self.config.attn_implementation
        if wanted == "auto":
            wanted = VARLEN_ATTN if self.device.type == "cuda" else "paged|sdpa"
        if wanted == VARLEN_ATTN:
            register_varlen_attention()
            if self.device.type == "cuda":
                problem = flash_varlen_self_test(self.device, self.model.dtype)
                if problem is not None:
                    logger.warning("flash varlen self-test failed (%s): falling back to paged|sdpa", problem)
                    wanted = "paged|sdpa"
        return wanted

    def _cb_config(self):
        on_cuda = self.device.type == "cuda"
        return manager_config(self.config, on_cuda, None if on_cuda else self._cpu_num_blocks())

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize

    def _cpu_num_blocks(self) -> int:
        budget = self.config.cpu_cache_bytes
        if budget is None:
            try:
                import psutil

                budget = min(int(psutil.virtual_memory().available * 0.25), 2 << 30)
            except ImportError:
                budget = 256 << 20
        return max(4, budget // (self.config.block_size * self.kv_bytes_per_token()))

    def start(self) -> None:
        from transformers import GenerationConfig

        if self.manager is not None:
            return
        check_transformers_version(self.config.allow_any_transformers)  # before touching any manager internals
        set_attention(self.model, self.attn_implementation)
        # Placeholder values only make the manager build the three per-request processors; every request overrides them.
        gen_config = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=16,
                                      eos_token_id=sorted(self.eos_token_ids) or -1,
                                      pad_token_id=self.model.generation_config.pad_token_id)
        self.manager = self.model.init_continuous_batching(generation_config=gen_config,
                                                           continuous_batching_config=self._cb_config())
        # Decode fast path: Transformers enables it only for flash-attn's kernels; ours serves the block table instead.
        self.decode_path = self._choose_decode_path()
        if self.decode_path is not None:
            use_decode_kernel(self.decode_path)
            enable_decode_fast_path(self.manager, self._max_blocks_per_request())
        self.fast_sampling = bool(self.config.fast_sampling) and install_fast_sampling(self.manager.logit_processor,
                                                                                     self.vocab_size)
        batch_processor = create_batch_processor(self.manager)
        if self.config.structured_outputs and self.fast_sampling:
            self._grammars = GrammarTable(self.vocab_size)
        elif self.config.structured_outputs:
            logger.warning("structured outputs off: they need fast_sampling (the processor list that applies masks)")
        if self.fast_sampling:
            hook_fast_sampling(batch_processor, self._grammars)
        if self.config.warmup:
            self.manager.warmup()
        self.manager.start()
        self._wait_for_cache()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="cuda-cb-emitter", daemon=True)
        self._thread.start()

    def _choose_decode_path(self) -> Optional[str]:
        name = self.config.decode_path
        if self.attn_implementation != VARLEN_ATTN or name == "off":
            return None
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "reference"
        if name not in DECODE_KERNELS:
            raise ValueError(f"decode_path must be auto, triton, reference or off, not {name!r}")
        if name == "triton":
            problem = ("needs CUDA" if self.device.type != "cuda"
                       else decode_kernel_self_test(self.device, self.model.dtype, "triton"))
            if problem is not None:
                logger.warning("triton paged decode kernel unavailable (%s): decode batches take the varlen path",
                               problem)
                return None
        return name

    def _max_blocks_per_request(self) -> int:
        if self.config.max_blocks_per_request is not None:
            return int(self.config.max_blocks_per_request)
        cfg = self.model.config.get_text_config()
        context = self.context_length or getattr(cfg, "max_position_embeddings", None) or 32768
        return min(1024, -(-int(context) // self.config.block_size) + 1)

    def _wait_for_cache(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while self.manager.batch_processor is None:
            if self.manager.background_thread_status.fatal_error is not None or time.monotonic() > end:
                raise RuntimeError(f"continuous batching failed to start: {self.manager.background_thread_status.fatal_error}")
            time.sleep(0.01)
        bp = self.manager.batch_processor
        cfg = self.manager.continuous_batching_config
        self.cache_info = {
            "attn_implementation": self.attn_implementation, "num_blocks": bp.cache.num_blocks,
            "block_size": bp.cache.block_size, "max_batch_tokens": bp.cache.max_batch_tokens,
            "kv_cache_capacity_bytes": bp.cache.num_blocks * bp.cache.block_size * self.kv_bytes_per_token(),
            "use_cuda_graph": list(cfg.cuda_graph_booleans), "use_async_batching": bool(cfg.use_async_batching),
            "max_requests_per_batch": cfg.max_requests_per_batch,
            "decode_path": self.decode_path, "max_blocks_per_request": bp.cache.max_blocks_per_request,
            "fast_sampling": self.fast_sampling, "structured_outputs": self.serves_grammars,
        }
        logger.info("cuda-cb engine ready: %s", self.cache_info)

    def stop(self) -> None:
        if self.manager is None:
            return
        with self._lock:
            ids = list(self._requests)
        for rid in ids:
            self.cancel(rid)
        deadline = time.monotonic() + 5.0
        while self._requests and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.01)
        self._stopping.set()
        self.manager.output_router.output_queue.put(_WAKE)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.manager.stop(block=True, timeout=10.0)
        self.manager.destroy()
        self.manager = None

    # ------------------------------------------------------------------------------------------ submit / cancel
    @property
    def serves_grammars(self) -> bool:
        """Whether SamplingParams.grammar is served (before start: whether it will be)."""
        if self.manager is None:
            return self.config.structured_outputs and self.config.fast_sampling
        return self._grammars is not None

    def check_params(self, params: SamplingParams) -> None:
        check_params(params, grammars=self.serves_grammars)

    def submit(self, request: GenerationRequest, emit: EmitFn) -> None:
        """Raises UnsupportedParameter at once (nothing queued) for parameters this engine cannot honour."""
        self.check_params(request.params)
        if self.manager is None:
            raise RuntimeError("engine not started")
        self._add(request, emit)  # the manager's input queue is thread-safe: no hop through our thread

    def cancel(self, request_id: str) -> None:
        self._cancels.put(request_id)
        if self.manager is not None:
            self.manager.output_router.output_queue.put(_WAKE)  # wake the emitter now

    def stats(self) -> EngineStats:
        bp = self.manager.batch_processor if self.manager is not None else None
        if bp is None:
            return EngineStats(0, len(self._requests), 0, 0, self._generated_total)
        used_blocks = bp.cache.num_blocks - bp.cache.get_num_free_blocks()
        return EngineStats(
            running_sequences=len(bp.scheduler.active_requests),
            waiting_requests=len(bp.scheduler.waiting_requests) + self.manager.input_queue.qsize(),
            batch_size_last_step=int(getattr(bp.inputs_and_outputs, "num_request_in_batch", 0) or 0),
            kv_cache_bytes=used_blocks * bp.cache.block_size * self.kv_bytes_per_token(),
            generated_tokens_total=self._generated_total,
        )

    # ------------------------------------------------------------------------------------------ emitter thread
    def _add(self, request: GenerationRequest, emit: EmitFn) -> None:
        p = request.params
        choices = [_Choice(f"{request.request_id}#{i}", i) for i in range(p.n)]
        entry = _Request(request, emit, choices, frozenset() if p.ignore_eos else self.eos_token_ids)
        with self._lock:
            self._requests[request.request_id] = entry
            for ch in choices:
                self._by_cb_id[ch.cb_id] = (entry, ch)
        eos = -1 if p.ignore_eos or not self.eos_token_ids else sorted(self.eos_token_ids)
        kwargs = processor_kwargs(p, self.vocab_size)
        for ch in choices:
            if p.grammar is not None:  # registered before the manager can schedule the request
                ch.grammar = self._grammars.add(ch.cb_id, p.grammar.matcher())
            self.manager.add_request(list(request.prompt_ids), request_id=ch.cb_id, max_new_tokens=p.max_tokens,
                                     streaming=True, eos_token_id=eos, **kwargs)

    def _finish(self, entry: _Request, reason: str) -> None:
        """End every unfinished choice of a request with ``reason`` and free its cache blocks."""
        outs = []
        for ch in entry.choices:
            if not ch.done:
                ch.done = True
                self.manager.cancel_request(ch.cb_id)
                outs.append(ChoiceOutput(ch.index, [], finish_reason=reason))
        self._forget(entry)
        if outs:
            entry.emit(entry.request.request_id, outs)

    def _forget(self, entry: _Request) -> None:
        with self._lock:
            self._requests.pop(entry.request.request_id, None)
            for ch in entry.choices:
                self._by_cb_id.pop(ch.cb_id, None)
                if ch.grammar is not None:
                    self._grammars.remove(ch.cb_id)

    def _drain_cancels(self) -> None:
        while True:
            try:
                request_id = self._cancels.get_nowait()
            except queue.Empty:
                return
            entry = self._requests.get(request_id)
            if entry is not None:
                self._finish(entry, "cancelled")

    def _collect(self, timeout: float) -> dict[str, Any]:
        """Latest output of each CB request that produced something; waits up to ``timeout`` for the first one."""
        out_q = self.manager.output_router.output_queue
        latest: dict[str, Any] = {}
        try:
            item = out_q.get(timeout=timeout)
        except queue.Empty:
            return latest
        while True:
            if item is not _WAKE:
                latest[item.request_id] = item  # outputs carry all tokens so far: the newest one is enough
            try:
                item = out_q.get_nowait()
            except queue.Empty:
                return latest

    def _deliver(self, latest: dict[str, Any]) -> None:
        per_request: dict[str, list[ChoiceOutput]] = {}
        entries: dict[str, _Request] = {}
        for cb_id, out in latest.items():
            found = self._by_cb_id.get(cb_id)
            if found is None:
                continue  # cancelled or cut: its final emit was already sent
            entry, ch = found
            tokens = out.generated_tokens[ch.sent:]
            reason, error = None, None
            if out.error is not None:
                self.last_error = out.error
                logger.error("request %s failed in the CB manager: %s", cb_id, out.error)
                reason = "cancelled"
            elif out.is_finished():
                reason, error, eos = _finish_reason(out.generated_tokens, entry.eos, ch.grammar)
                if eos:
                    tokens = tokens[:-1]  # the EOS token is not part of the text
            if not tokens and reason is None:
                continue
            ch.sent = len(out.generated_tokens)
            self._generated_total += len(tokens)
            if reason is not None:
                ch.done = True
            per_request.setdefault(entry.request.request_id, []).append(
                ChoiceOutput(ch.index, tokens, None, reason, error))
            entries[entry.request.request_id] = entry
        for rid, outs in per_request.items():
            entry = entries[rid]
            if all(ch.done for ch in entry.choices):
                self._forget(entry)
            try:
                entry.emit(rid, outs)
            except Exception:  # noqa: BLE001 - a broken emit must not stop the engine thread
                logger.exception("emit failed for request %s", rid)

    def _cut_deadlines(self) -> None:
        now = time.time()
        for entry in list(self._requests.values()):
            if entry.request.deadline is not None and now >= entry.request.deadline:
                self._finish(entry, "length")

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_cancels()
                if self.manager.background_thread_status.fatal_error is not None and self._requests:
                    self.last_error = str(self.manager.background_thread_status.fatal_error)
                    for entry in list(self._requests.values()):
                        self._finish(entry, "cancelled")
                self._deliver(self._collect(timeout=0.02))
                self._cut_deadlines()
            except Exception:  # noqa: BLE001 - keep serving the other requests
                logger.exception("cuda-cb emitter loop error")
                time.sleep(0.01)
