"""Shared by the cuda-cb engine tests: a tiny random Qwen2 (256-token vocabulary), prompts, the greedy reference from
``model.generate``, and an emit collector."""

from __future__ import annotations

import threading
import time

import torch
import transformers

VOCAB = 256


def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


class Collector:
    """Gathers emits per request; ``wait`` blocks until each named request has finished every choice."""

    def __init__(self):
        self.tokens: dict[str, dict[int, list[int]]] = {}
        self.finish: dict[str, dict[int, str]] = {}
        self.errors: dict[str, dict[int, str]] = {}
        self.emits: dict[str, int] = {}
        self.cv = threading.Condition()

    def __call__(self, request_id, outputs):
        with self.cv:
            self.emits[request_id] = self.emits.get(request_id, 0) + 1
            for out in outputs:
                self.tokens.setdefault(request_id, {}).setdefault(out.index, []).extend(out.token_ids)
                if out.finish_reason is not None:
                    self.finish.setdefault(request_id, {})[out.index] = out.finish_reason
                if out.error is not None:
                    self.errors.setdefault(request_id, {})[out.index] = out.error
            self.cv.notify_all()

    def wait_for(self, check, what: str, timeout: float):
        """Until ``check()`` holds (looked at on every emit, under the lock); fails naming ``what`` at the deadline."""
        with self.cv:
            assert self.cv.wait_for(check, timeout), f"timed out after {timeout} s waiting for {what}"

    def wait(self, expected: dict[str, int], timeout=60.0):
        end = time.monotonic() + timeout
        with self.cv:
            while any(len(self.finish.get(r, {})) < n for r, n in expected.items()):
                left = end - time.monotonic()
                assert left > 0, f"timed out; finished so far: {self.finish}"
                self.cv.wait(left)


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (length,), generator=g).tolist()


def reference_greedy(model, ids, n_new):
    model.set_attn_implementation("sdpa")
    out = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=n_new)
    return out[0, len(ids):].tolist()
