"""The converted-weights cache: an entry reloads to the same tokenizer and the same logits as the GGUF it came from, a
corrupted or foreign entry is rebuilt instead of loaded, and the worker's own load uses it on a second start."""

from __future__ import annotations

import json

import pytest
import torch

from llm_worker import model as model_mod
from llm_worker import weights_cache
from llm_worker.config import load_config

from conftest import chat_ids


@pytest.fixture()
def entry(tmp_path, loaded):
    path, key = weights_cache.entry_dir(tmp_path, model_mod.bundled_gguf_path(), torch.float32)
    weights_cache.store(path, key, loaded.tokenizer, loaded.model)
    return path, key


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_an_entry_reloads_to_the_same_tokenizer_and_logits(entry, loaded):
    path, key = entry
    manifest = json.loads((path / weights_cache.MANIFEST).read_text())
    assert manifest["key"] == key and "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    tokenizer, model = weights_cache.load(path, key, torch.float32, {})
    ids = chat_ids(loaded.tokenizer, "Hello <|im_start|>system there")
    assert chat_ids(tokenizer, "Hello <|im_start|>system there") == ids
    assert model_mod.export_tokenizer(tokenizer)[2] == model_mod.export_tokenizer(loaded.tokenizer)[2]
    assert model_mod.stop_token_ids(model, tokenizer) == loaded.eos_token_ids
    assert torch.equal(_logits(model, ids), _logits(loaded.model, ids))


def test_a_corrupted_entry_is_removed_not_loaded(entry):
    path, key = entry
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_cache.load(path, key, torch.float32, {}) is None
    assert not path.exists()


def test_an_entry_of_another_key_is_not_loaded(entry):
    path, key = entry
    assert weights_cache.load(path, {**key, "dtype": "bfloat16"}, torch.float32, {}) is None


def test_an_incomplete_entry_is_ignored(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    assert weights_cache.load(tmp_path / "partial", {}, torch.float32, {}) is None


def test_the_worker_load_uses_an_entry(tmp_path, loaded, caplog):
    # The entry a first start would have written (the same store() call), then a start as the worker does it.
    cfg = load_config({"DTYPE": "float32", "WEIGHTS_CACHE_DIR": str(tmp_path)})
    path, key = model_mod._cache_entry(cfg, *model_mod.resolve_source(cfg)[:2], torch.float32, None)
    weights_cache.store(path, key, loaded.tokenizer, loaded.model)
    with caplog.at_level("INFO", logger="llm_worker.weights_cache"):
        second = model_mod.load(cfg)
    assert any("loaded converted weights from the cache" in r.message for r in caplog.records)
    ids = chat_ids(loaded.tokenizer, "Tell me about the sea.")
    assert torch.equal(_logits(second.model, ids), _logits(loaded.model, ids))
    assert second.context_length == loaded.context_length and second.eos_token_ids == loaded.eos_token_ids


def test_no_entry_when_off_or_not_a_local_gguf(tmp_path):
    off = load_config({"WEIGHTS_CACHE_DIR": "off"})
    assert model_mod._cache_entry(off, *model_mod.resolve_source(off)[:2], torch.float32, None) is None
    hub = load_config({"WEIGHTS_CACHE_DIR": str(tmp_path)})
    assert model_mod._cache_entry(hub, "Qwen/Qwen2.5-7B-Instruct-GGUF", "q4.gguf", torch.float32, None) is None
    assert model_mod._cache_entry(hub, "Qwen/Qwen2.5-7B-Instruct", None, torch.float32, None) is None
