"""``CudaCBConfig``: the engine's knobs, and how they map onto Transformers' ``ContinuousBatchingConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class CudaCBConfig:
    """Knobs of the continuous-batching manager. ``None`` means: choose from the device and the memory free."""

    attn_implementation: str = "auto"  # auto: paged|torch_flash_varlen on CUDA when its self-test passes, else paged|sdpa
    block_size: int = 64  # tokens per cache block
    num_blocks: Optional[int] = None  # None: sized from free memory
    max_batch_tokens: Optional[int] = None  # tokens per forward pass; None: 2048 on CUDA, 256 on CPU
    # CUDA: share of the memory free after the model is loaded that goes to the KV cache. 0.8 is what the H100 sweep
    # of 2026-11-25 ran with: the decode path's warm-up samples 1024 rows of 152k logits (a few GB of temporaries).
    memory_fraction: float = 0.8
    cpu_cache_bytes: Optional[int] = None  # CPU: KV cache budget; None: min(25% of available RAM, 2 GiB)
    max_requests_per_batch: Optional[int] = None
    use_cuda_graph: Optional[bool] = None  # None: on for the varlen flash path on CUDA
    # None: off while structured_outputs is on, else Transformers' choice (on with CUDA graphs). True with
    # structured_outputs is refused: async batching prepares step N+1 before step N's tokens are known (constrained.py).
    use_async_batching: Optional[bool] = None
    q_padding_interval_size: int = 0  # 0: Transformers' presets (CUDA graphs pad query/KV sizes to these steps)
    kv_padding_interval_size: int = 0
    warmup: bool = True  # capture the largest CUDA graph before serving
    seed: Optional[int] = None  # seed of the batch-wide random stream
    # Decode fast path (batches where every sequence adds one token): attention reads the paged cache through a block
    # table instead of per-token read indices. "auto": the Triton kernel on CUDA when its self-test passes, the torch
    # reference on CPU; "triton" / "reference" force one; "off": every batch takes the varlen path. Only with VARLEN_ATTN.
    decode_path: str = "auto"
    max_blocks_per_request: Optional[int] = None  # decode path: longest sequence in blocks; None: from context length
    # Sampling work chosen per batch on the host: greedy-only batches take an argmax, batches without top-k/top-p
    # skip the vocabulary sorts, and the others do one sort for both (False: the manager's three processors as is).
    fast_sampling: bool = True
    # Run on a Transformers outside patches.SUPPORTED_TRANSFORMERS (logs a warning instead of refusing to start).
    # Worker setting CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS.
    allow_any_transformers: bool = False
    # Serve SamplingParams.grammar (response_format, forced tool calls): per-request token masks (constrained.py). Needs
    # synchronous batching and fast_sampling. False: async batching allowed, grammars refused (param response_format).
    # Worker setting CUDA_STRUCTURED_OUTPUTS.
    structured_outputs: bool = True


def async_batching(c: CudaCBConfig, on_cuda: bool) -> Optional[bool]:
    """The manager's use_async_batching: off with structured outputs (constrained.py: masks need step N's tokens before
    step N+1 is prepared), else as configured (None: Transformers decides: on with CUDA graphs); never on CPU."""
    if c.structured_outputs and c.use_async_batching:
        raise ValueError("use_async_batching=True needs structured_outputs=False: with async batching the grammar "
                         "masks of step N+1 would be built before step N's tokens are known")
    wanted = False if c.structured_outputs else c.use_async_batching
    return None if wanted is None and on_cuda else bool(wanted) and on_cuda


def manager_config(c: CudaCBConfig, on_cuda: bool, cpu_num_blocks: Optional[int]):
    """The ContinuousBatchingConfig for ``c``; ``cpu_num_blocks``: the CPU cache size (None on CUDA: from free memory)."""
    from transformers import ContinuousBatchingConfig

    max_batch_tokens = c.max_batch_tokens or (2048 if on_cuda else 256)
    num_blocks = c.num_blocks if c.num_blocks is not None else cpu_num_blocks
    kwargs = dict(block_size=c.block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                  max_memory_percent=c.memory_fraction, max_requests_per_batch=c.max_requests_per_batch,
                  per_request_processors=True, seed=c.seed, allow_block_sharing=True)
    if c.use_cuda_graph is not None or not on_cuda:
        kwargs["use_cuda_graph"] = bool(c.use_cuda_graph) and on_cuda
    use_async = async_batching(c, on_cuda)
    if use_async is not None:
        kwargs["use_async_batching"] = use_async
    if c.q_padding_interval_size:
        kwargs["q_padding_interval_size"] = c.q_padding_interval_size
    if c.kv_padding_interval_size:
        kwargs["kv_padding_interval_size"] = c.kv_padding_interval_size
    return ContinuousBatchingConfig(**kwargs)
