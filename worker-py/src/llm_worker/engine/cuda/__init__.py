"""The GPU engine: Transformers' continuous-batching manager behind our ``Engine``, one module per concern.

- engine.py: ``CudaContinuousBatchingEngine`` and its ``CudaCBConfig`` (requests, emitter thread, cancel, deadlines,
  cache sizing, start-up).
- params.py: which sampling parameters are served per request and how (``PARAMETER_SUPPORT``, ``check_params``).
- patches.py: every change inside the manager's private internals (per-batch sampling work, start-up hooks) and the
  Transformers version check that guards them.
- attention.py: the ``paged|torch_flash_varlen`` attention function registered with Transformers (paged cache read,
  decode fast path through the block table).
- kernels.py: the Triton paged-decode kernel, torch's FlashAttention varlen call, their torch references and
  self-tests (no Transformers import).

Import from here (``from llm_worker.engine.cuda import CudaContinuousBatchingEngine``); the modules are imported only
when the cuda-cb engine is asked for.
"""

from .attention import VARLEN_ATTN
from .engine import CudaCBConfig, CudaContinuousBatchingEngine
from .kernels import decode_kernel_self_test, flash_varlen_self_test, paged_decode_reference, paged_decode_triton
from .params import PARAMETER_SUPPORT, UnsupportedParameter, check_params
from .patches import SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, check_transformers_version

__all__ = [
    "VARLEN_ATTN", "CudaCBConfig", "CudaContinuousBatchingEngine", "PARAMETER_SUPPORT", "SUPPORTED_TRANSFORMERS",
    "UnsupportedParameter", "UnsupportedTransformersVersion", "check_params", "check_transformers_version",
    "decode_kernel_self_test", "flash_varlen_self_test", "paged_decode_reference", "paged_decode_triton",
]
