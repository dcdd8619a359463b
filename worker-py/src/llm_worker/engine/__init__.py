"""Generation engines (no Redis, no BullMQ, no text): see base.py for the interface.

``create_engine`` picks one from ENGINE (auto: cuda-cb on a GPU, cpu-batch otherwise). Both engines are constructed
with the same keyword arguments: ``Engine(model, eos_token_ids=..., max_batch=..., context_length=...)``.
"""

from __future__ import annotations

from typing import Optional

from .base import Engine


def engine_name(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return "cuda-cb" if device == "cuda" else "cpu-batch"


def create_engine(name: str, model, *, eos_token_ids: set[int], max_batch: int, context_length: int,
                  num_threads: Optional[int] = None, kv_token_budget: Optional[int] = None, prefill_chunk_tokens: int = 0,
                  prefill_chunk_step_ratio: float = 0.0,
                  cuda_allow_any_transformers: bool = False, cuda_structured_outputs: bool = True) -> Engine:
    if name == "cuda-cb":
        from .cuda import CudaCBConfig, CudaContinuousBatchingEngine  # imported only when asked for (Transformers CB)

        config = CudaCBConfig(allow_any_transformers=cuda_allow_any_transformers,
                              structured_outputs=cuda_structured_outputs)
        return CudaContinuousBatchingEngine(model, config, eos_token_ids=eos_token_ids, max_batch=max_batch,
                                            context_length=context_length)
    if name == "standin":
        from .standin import StandInEngine  # benchmark only: no model runs (see its docstring)

        return StandInEngine(model, eos_token_ids=eos_token_ids, max_batch=max_batch, context_length=context_length)
    from .cpu_batch import CpuBatchEngine

    return CpuBatchEngine(model, eos_token_ids=eos_token_ids, max_batch=max_batch, context_length=context_length,
                          num_threads=num_threads, kv_token_budget=kv_token_budget,
                          prefill_chunk_tokens=prefill_chunk_tokens, prefill_chunk_step_ratio=prefill_chunk_step_ratio)
