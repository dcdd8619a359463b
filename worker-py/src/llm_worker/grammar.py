"""Structured outputs: JSON schemas (and later tool-call grammars) compiled to per-choice token masks with llguidance.

Why llguidance (issue 10 compares it with xgrammar and outlines-core): its tokenizer is ready once per process in
~0.5 s for the bundled 49k vocabulary and ~2 s for Qwen's 152k, compiles a typical schema in ~1 ms with either (so no
schema needs to be precompiled), computes a mask lazily in ~0.01 ms per row per step (median; p90 ~0.15 ms) with a
hard per-step budget (``step_lexer_fuel``) (the 2-core CI machine, bench/cpu/structured.py), drops the GIL while it
works, names the schema keywords it does not implement (``Unimplemented keys: ["not"]``) instead of ignoring them,
and ships as one small Rust wheel without a torch.compile step (its own ``apply_token_bitmask_inplace`` needs
torch.compile, which on CPU needs a C++ toolchain; ``apply_masks`` below does the same without it).

The engine sees only ``CompiledGrammar.matcher()`` and the functions at the bottom of this module: one ``RowMatcher``
per choice (its own parser state, so a constrained row never waits for another row) and a batched mask application
over the constrained rows only, so unconstrained rows beside them pay nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .model import encode_text

log = logging.getLogger("llm_worker.grammar")

# JSON compile options: no free whitespace between tokens. With it, small models (the bundled 135M one) tend to fill
# max_tokens with newlines inside an object; compact JSON is what OpenAI's JSON mode returns too.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response format the grammar library cannot serve (unsupported keyword, unsatisfiable or too complex schema):
    the client's error, a 400 naming ``response_format``."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to, and the cache key: ``kind`` "json_schema" with ``source`` the schema as compact JSON."""

    kind: str
    source: str

    @staticmethod
    def json_schema(schema: Any) -> "GrammarSpec":
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object (or true)")
        # Keys keep their order: the output lists properties in the schema's order (sorting would reorder them).
        return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


class RowMatcher:
    """The grammar state of one choice: which tokens may come next, and whether the output is complete."""

    __slots__ = ("_m",)

    def __init__(self, matcher) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def consume(self, token_id: int) -> None:
        self._m.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow (the row ends with finish_reason "stop")."""
        return self._m.is_stopped()

    @property
    def error(self) -> Optional[str]:
        return self._m.get_error() if self._m.is_error() else None


class CompiledGrammar:
    """A compiled grammar; ``matcher()`` gives each choice a fresh copy of its initial state (no recompilation)."""

    def __init__(self, template, spec: GrammarSpec, compile_ms: float) -> None:
        self._template = template
        self.spec = spec
        self.compile_ms = compile_ms

    def matcher(self) -> RowMatcher:
        return RowMatcher(self._template.deep_copy())


class GrammarCompiler:
    """Compiles response formats for one tokenizer, caching compiled grammars by their canonical source (LRU)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256) -> None:
        import llguidance

        self._ll = llguidance
        started = time.monotonic()
        # n_vocab: the model's logits width (may exceed the tokenizer's length); eos: the worker's stop tokens (the
        # template's turn end; the GGUF's own eos is wrong, see model.py), allowed once the output is complete.
        self._tokenizer = llguidance.LLTokenizer(_tokenizer_json(tokenizer), n_vocab=vocab_size,
                                                 eos_token=list(eos_token_ids))
        _check_token_bytes(self._tokenizer, tokenizer)
        self.vocab_size = vocab_size
        self.tokenizer_seconds = time.monotonic() - started
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # compile() runs on the executor's thread; cached() on the event loop
        self.compiled_total = 0
        # One thread compiles, whatever arrives: a burst of expensive schemas queues here (and times out with a 400)
        # instead of taking every core from the engine; a schema already compiled never waits (``cached``).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def cached(self, spec: GrammarSpec) -> Optional[CompiledGrammar]:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
            return hit

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec`` (cached); raises GrammarError naming what the library refused."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        started = time.monotonic()
        if spec.kind == "json_schema":
            try:
                grammar = self._ll.LLMatcher.grammar_from_json_schema(spec.source, defaults=_JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema cannot be used: {exc}") from exc
        elif spec.kind == "lark":  # built by the gateway (tool calls), never a client's text
            grammar = self._ll.LLMatcher.grammar_from_lark(spec.source)
        else:
            raise GrammarError(f"unknown grammar kind {spec.kind!r}")
        template = self._ll.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(_describe(template.get_error()))
        compiled = CompiledGrammar(template, spec, (time.monotonic() - started) * 1000)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.compiled_total += 1
        return compiled

    def warm_up(self) -> float:
        """Compile a small schema and compute its first masks: llguidance builds lazy tables on first use (~1 s on the
        bundled model's vocabulary), which must not land on the first client's time to first token. Returns seconds."""
        started = time.monotonic()
        row = self.compile(GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})).matcher()
        mask = allocate_masks(1, self.vocab_size)
        for token in self._tokenizer.tokenize_str('{"a":"b"}'):
            row.fill(mask, 0)
            row.consume(token)
        return time.monotonic() - started


class BackgroundGrammarCompiler:
    """The worker's GrammarCompiler, built on its own thread after the worker is ready instead of before.

    Building it (llguidance's tokenizer for the vocabulary, a check of its token bytes, a warm-up compile) took 1.0-2.0 s
    of every start of the bundled model (bench/RESULTS.md, issue 14 target 1), for a feature most requests do not use.
    A request with a response_format that arrives while it is still being built waits for it (``get``), so none fails
    because the worker started recently; its own compile timeout starts once the compiler is there.
    """

    def __init__(self, build: Callable[[], Optional[GrammarCompiler]]):
        self._build = build
        self._future: Future = Future()
        self._lock = threading.Lock()
        self._started = False
        self.waiting = 0  # requests waiting for the build now (loop thread only)

    @classmethod
    def built(cls, compiler: Optional[GrammarCompiler]) -> "BackgroundGrammarCompiler":
        """One that is ready at once (tests, or a compiler built elsewhere)."""
        made = cls(lambda: compiler)
        made.start()
        return made

    def start(self) -> None:
        """Begin building (once; later calls do nothing)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            # Running: a waiter's cancellation (a job cancelled while it waits) then cannot cancel the build for others.
            self._future.set_running_or_notify_cancel()
        threading.Thread(target=self._run, name="grammar-build", daemon=True).start()

    def _run(self) -> None:
        try:
            compiler = self._build()
        except Exception:  # structured outputs are then refused with a 400; everything else is served
            log.exception("building the grammar compiler failed; structured outputs unavailable")
            compiler = None
        self._future.set_result(compiler)

    @property
    def ready(self) -> bool:
        return self._future.done()

    async def get(self) -> Optional[GrammarCompiler]:
        """The compiler, once built (None: this worker cannot constrain outputs). Starts the build if nothing has."""
        self.start()
        if self._future.done():
            return self._future.result()
        self.waiting += 1
        try:
            return await asyncio.wrap_future(self._future)
        finally:
            self.waiting -= 1


def _tokenizer_json(tokenizer) -> str:
    """The fast tokenizer's JSON for llguidance, with a byte-level decoder made plain.

    llguidance reads a vocabulary as byte-level (GPT-2's "Ġ" = space, "Ċ" = newline) only when the decoder *is*
    ByteLevel. Transformers' GGUF conversion (the bundled model) wraps it: Sequence[ByteFallback, Fuse, Replace("▁"),
    ByteLevel], which is the same thing for a byte-level vocabulary (no "<0x..>" or "▁" tokens) but made llguidance
    take "Ċ" for two letters and allow a raw newline inside a JSON string.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise GrammarError("structured outputs need a fast (Rust) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    spec["padding"] = spec["truncation"] = None
    return json.dumps(spec)


def _check_token_bytes(ll_tokenizer, tokenizer) -> None:
    """The bytes llguidance assigns to tokens must be the bytes the tokenizer decodes them to, or its masks would be
    wrong in ways that pass unnoticed (a forbidden newline inside a string). Checked on text that covers the remapped
    bytes of byte-level vocabularies: whitespace, control characters, non-ASCII."""
    for text in ("\n", "\t", " a", "  b\n\n", "é ü", "naïve café", "\u4e2d\u6587", "\"quoted\"\\"):
        ids = encode_text(tokenizer, text, add_special_tokens=False, split_special_tokens=False)
        got = ll_tokenizer.decode_bytes(ids)
        if got != text.encode("utf-8"):
            raise GrammarError(f"llguidance reads this tokenizer's tokens as {got!r} where the tokenizer decodes "
                               f"{text!r}: structured outputs are off for this model")


def _describe(error: str) -> str:
    # llguidance's messages are precise ("Unimplemented keys: [\"not\"]", "Unsatisfiable schema: ..."); keep them,
    # trimmed, as the client's message.
    text = " ".join(error.split())
    return f"the JSON schema cannot be used: {text[:500]}"


# ---- batched mask application (engine side) -------------------------------------------------------------------------
_BITS = {"cpu": torch.arange(32, dtype=torch.int32)}  # per device: the CUDA engine masks rows on the GPU

# Below this many usable CPUs the rows are filled one call each, on the engine thread: on the 2-core CI machine
# llguidance's pool cost as much (8 rows: 0.26 ms either way) or more (0.58 against 0.38 ms with other processes on the
# cores: the hand-off to its thread waits for a core) — bench/cpu/structured.py, bench/RESULTS.md. With more cores the
# rows are computed side by side; not measured here.
_POOL_MIN_CPUS = 4
_executor = None
_pool_pays: Optional[bool] = None
_executor_lock = threading.Lock()


def _llg_executor():
    """llguidance's thread pool (Rust threads), one per process, as many threads as this process may use (its own
    default, 80 % of ``os.cpu_count()``, counts a container's whole node)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            from .engine.cpus import usable_cpus

            _executor = llguidance.LLExecutor(min(usable_cpus(), 32))
        return _executor


def _use_pool() -> bool:
    global _pool_pays
    if _pool_pays is None:
        from .engine.cpus import usable_cpus

        _pool_pays = usable_cpus() >= _POOL_MIN_CPUS
    return _pool_pays


def allocate_masks(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask [rows, ceil(vocab/32)], all tokens allowed (llguidance's layout), contiguous."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_masks(matchers: list[RowMatcher], bitmask: torch.Tensor, pool: Optional[bool] = None) -> None:
    """Row j of ``bitmask`` (from ``allocate_masks``) gets the tokens ``matchers[j]`` allows next.

    ``pool`` (default: where at least ``_POOL_MIN_CPUS`` CPUs are usable): all rows in one call to llguidance's
    ``LLExecutor`` (as ``llguidance.torch.fill_next_token_bitmask_par``), computed on its threads with the GIL released.
    """
    if pool is None:
        pool = len(matchers) > 1 and _use_pool()
    if not pool:
        for j, m in enumerate(matchers):
            m.fill(bitmask, j)
        return
    assert bitmask.is_contiguous() and bitmask.dtype == torch.int32 and bitmask.device.type == "cpu"
    rows, words = bitmask.shape
    _llg_executor().unsafe_compute_mask_ptr([(m._m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                            words * 4, rows)


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[list[int]] = None) -> None:
    """Set the logits of disallowed tokens to -inf, in place: row ``rows[j]`` of ``logits`` [B, V] (row j when ``rows``
    is None) by ``bitmask[j]`` [R, ceil(V/32)], on the logits' device (``bitmask`` on the same device).

    CPU float32 (the CPU engine): numpy, one C pass per step: the bits unpacked (llguidance's layout is token t = bit
    t % 32 of word t // 32, i.e. bit t % 8 of byte t // 8 on a little-endian host, numpy's ``bitorder="little"``), then
    each constrained row written where it lies. 8 rows of the bundled model's 49k vocabulary: 0.15 ms, where torch's
    shift-and-compare over [R, words, 32] int32 with a gather and scatter of the rows took 0.4-0.7 ms alone and ~1.7 ms
    in the engine beside other processes (bench/RESULTS.md): torch ops on 49k-element rows mostly pay the engine's
    OpenMP team starting. Elsewhere (the CUDA engine's scores on the GPU): the torch shift-and-compare.
    """
    vocab = logits.shape[-1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and bitmask.device.type == "cpu":
        forbidden = np.unpackbits(~bitmask.numpy().view(np.uint8), axis=-1, bitorder="little").view(bool)[:, :vocab]
        out = logits.numpy()
        for j, i in enumerate(range(len(bitmask)) if rows is None else rows):
            np.copyto(out[i], -np.inf, where=forbidden[j])
        return
    bits = _BITS.get(str(bitmask.device))
    if bits is None:
        bits = _BITS.setdefault(str(bitmask.device), _BITS["cpu"].to(bitmask.device))
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).view(len(bitmask), -1)[:, :vocab]
    if rows is None:
        logits[: len(bitmask)].masked_fill_(allowed == 0, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        picked = logits.index_select(0, index).masked_fill_(allowed == 0, float("-inf"))
        logits.index_copy_(0, index, picked)
