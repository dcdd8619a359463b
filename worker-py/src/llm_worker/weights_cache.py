"""Converted-weights cache: a GGUF model is dequantised once, then loaded from plain safetensors on later starts.

Transformers' GGUF loader parses the file with the pure-Python ``gguf`` reader twice (tokenizer, then weights: ~9 s
and ~15 s for the bundled 135M model on a 2-core EPYC) and dequantises every tensor, at every start. The result
depends only on the GGUF file, the Transformers version and the dtype, so it is kept in a cache directory keyed by those
three; a later start loads the tokenizer from its ``tokenizer.json`` and the weights from safetensors in ~1-2 s.

Integrity: the entry's manifest records the SHA-256 of every file it holds, written last (an entry without one is
incomplete and ignored); a start verifies each file against it before loading, and an entry that does not match is
deleted and rebuilt. Entries are written to a temporary directory and renamed into place, so concurrent workers on one
machine never read half an entry (the last one to finish wins, with identical contents).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("llm_worker.weights_cache")

MANIFEST = "llm-worker-manifest.json"
_CHUNK = 8 << 20


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-worker" / "converted"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def entry_dir(root: Path, gguf_path: Path, dtype: Any,
              transformers_version: Optional[str] = None) -> tuple[Path, dict[str, str]]:
    """The cache entry for this GGUF file, Transformers version and dtype, and the key it is filed under.
    ``transformers_version``: given by a caller that has not imported Transformers yet (model.py's early check)."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    key = {"gguf_sha256": _sha256(gguf_path), "transformers": transformers_version,
           "dtype": str(dtype).removeprefix("torch.")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / f"{gguf_path.stem}-{digest}", key


def check(entry: Path, key: dict[str, str]) -> bool:
    """Whether ``entry`` is complete and every file matches its manifest's checksum; an entry that does not is removed
    (logged). Reads and hashes without the GIL for the most part, so it can run on a thread beside imports."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key:
            raise ValueError("its key does not match this file, Transformers version and dtype")
        for name, digest in manifest["files"].items():
            if _sha256(entry / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("converted-weights cache entry is unusable; converting again", extra={"entry": str(entry),
                                                                                           "reason": str(exc)})
        shutil.rmtree(entry, ignore_errors=True)
        return False
    return True


def load(entry: Path, key: dict[str, str], dtype: Any, common: dict[str, Any],
         checked: Optional[bool] = None) -> Optional[tuple[Any, Any]]:
    """(tokenizer, model) from a verified entry, or None when there is none (or it was corrupt: then it is removed).
    ``checked``: the result of ``check(entry, key)`` when the caller has already run it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if not (check(entry, key) if checked is None else checked):
        return None
    verified = time.monotonic() - started
    options = {k: v for k, v in common.items() if k != "gguf_file"}
    tokenizer = AutoTokenizer.from_pretrained(entry, **options)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, **options)
    log.info("loaded converted weights from the cache", extra={"entry": str(entry), "verifySeconds": round(verified, 2),
                                                                "seconds": round(time.monotonic() - started, 2)})
    return tokenizer, model


def _save_weights(model: Any, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors. ``save_pretrained`` refuses a model loaded from a
    GGUF file (its quantizer marks it not serialisable), although its weights are plain dequantised tensors by then;
    the config is saved without the GGUF quantization entry, so the entry loads as an ordinary checkpoint."""
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))  # tied weights (embeddings = lm_head) stored once


def store(entry: Path, key: dict[str, str], tokenizer: Any, model: Any) -> None:
    """Write an entry (tokenizer, config, safetensors weights, manifest last), atomically. Failures only log: the
    worker runs as well without the cache, it just starts slower next time."""
    started = time.monotonic()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        tokenizer.save_pretrained(tmp)
        _save_weights(model, tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        log.info("converted weights cached for the next start", extra={"entry": str(entry),
                                                                       "seconds": round(time.monotonic() - started, 2)})
    except Exception as exc:  # a full disk or a read-only cache must not stop the worker
        log.warning("could not cache the converted weights", extra={"entry": str(entry), "reason": str(exc)})
        shutil.rmtree(tmp, ignore_errors=True)
