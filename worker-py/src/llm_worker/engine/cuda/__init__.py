"""The GPU engine: Transformers' continuous-batching manager behind our ``Engine``, one module per concern.

- engine.py: ``CudaContinuousBatchingEngine`` (requests, emitter thread, cancel, deadlines, cache sizing, start-up).
- config.py: ``CudaCBConfig`` and its mapping onto Transformers' ``ContinuousBatchingConfig``.
- params.py: which sampling parameters are served per request and how (``PARAMETER_SUPPORT``, ``check_params``).
- patches.py: every change inside the manager's private internals (per-batch sampling work, grammar masks and
  token feeding, start-up hooks) and the Transformers version check that guards them.
- constrained.py: structured outputs (one grammar matcher per CB request, per-step row masks) and why they need
  synchronous batching and eager steps.
- attention.py: the ``paged|torch_flash_varlen`` attention function registered with Transformers (paged cache read,
  decode fast path through the block table).
- kernels.py: the Triton paged-decode kernel, torch's FlashAttention varlen call, their torch references and
  self-tests (no Transformers import).

Import from here (``from llm_worker.engine.cuda import CudaContinuousBatchingEngine``); the modules are imported only
when the cuda-cb engine is asked for.
"""

from .attention import VARLEN_ATTN
from .config import CudaCBConfig
from .engine import CudaContinuousBatchingEngine
from .kernels import decode_kernel_self_test, flash_varlen_self_test, paged_decode_reference, paged_decode_triton
from .params import PARAMETER_SUPPORT, UnsupportedParameter, check_params
from .patches import SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, check_transformers_version

__all__ = [
    "VARLEN_ATTN", "CudaCBConfig", "CudaContinuousBatchingEngine", "PARAMETER_SUPPORT", "SUPPORTED_TRANSFORMERS",
    "UnsupportedParameter", "UnsupportedTransformersVersion", "check_params", "check_transformers_version",
    "decode_kernel_self_test", "flash_varlen_self_test", "paged_decode_reference", "paged_decode_triton",
]
