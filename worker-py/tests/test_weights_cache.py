"""The converted-weights cache: an entry reloads to the same tokenizer and the same logits as the GGUF it came from, a
corrupted or foreign entry is rebuilt instead of loaded, and the worker's own load uses it on a second start."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llm_worker import model as model_mod
from llm_worker import weights_cache
from llm_worker.config import load_config

from conftest import chat_ids


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    """A worker's first start with an empty cache (GGUF read, dequantised, stored). Not the session's shared model:
    the CPU engine repacks that one's linear layers in place, so its weights are no longer what a start stores."""
    root = tmp_path_factory.mktemp("converted")
    cfg = load_config({"DTYPE": "float32", "WEIGHTS_CACHE_DIR": str(root)})
    loaded = model_mod.load(cfg)
    (entry,) = list(root.iterdir())
    _, key = model_mod._cache_entry(cfg, *model_mod.resolve_source(cfg)[:2], torch.float32, None)
    return cfg, loaded, entry, key


@pytest.fixture()
def entry_copy(first_start, tmp_path):
    _, _, entry, key = first_start
    copy = tmp_path / entry.name
    shutil.copytree(entry, copy)
    return copy, key


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_an_entry_reloads_to_the_same_tokenizer_and_logits(first_start):
    _, loaded, path, key = first_start
    manifest = json.loads((path / weights_cache.MANIFEST).read_text())
    assert manifest["key"] == key and "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    tokenizer, model = weights_cache.load(path, key, torch.float32, {})
    ids = chat_ids(loaded.tokenizer, "Hello <|im_start|>system there")
    assert chat_ids(tokenizer, "Hello <|im_start|>system there") == ids
    assert model_mod.export_tokenizer(tokenizer)[2] == model_mod.export_tokenizer(loaded.tokenizer)[2]
    assert model_mod.stop_token_ids(model, tokenizer) == loaded.eos_token_ids
    assert torch.equal(_logits(model, ids), _logits(loaded.model, ids))


def test_a_corrupted_entry_is_removed_not_loaded(entry_copy):
    path, key = entry_copy
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_cache.load(path, key, torch.float32, {}) is None
    assert not path.exists()


def test_an_entry_of_another_key_is_not_loaded(entry_copy):
    path, key = entry_copy
    assert weights_cache.load(path, {**key, "dtype": "bfloat16"}, torch.float32, {}) is None


def test_an_incomplete_entry_is_ignored(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    assert weights_cache.load(tmp_path / "partial", {}, torch.float32, {}) is None


def test_a_second_start_loads_the_entry(first_start, caplog):
    cfg, loaded, _, _ = first_start
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
