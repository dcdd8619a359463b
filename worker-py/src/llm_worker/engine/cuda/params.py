"""Which sampling parameters the CUDA engine serves per request, and how (``PARAMETER_SUPPORT``, the source of
``check_params``). What the manager cannot do per request is refused before anything is queued with
``UnsupportedParameter`` (code ``invalid_request``; the transport turns it into a 400 naming ``param``).
"""

from __future__ import annotations

from typing import Any

from ..base import SamplingParams

# How each SamplingParams field is served by this engine (documentation and the source of check_params).
PARAMETER_SUPPORT = {
    "max_tokens": "per request: max_new_tokens",
    "temperature": "per request: temperature processor; 0 = greedy, served as top_k=1",
    "top_p": "per request: top_p processor",
    "top_k": "per request: top_k processor (0 = off)",
    "ignore_eos": "per request: eos_token_id=-1",
    "n": "per request: n CB requests sharing the prompt's complete cache blocks",
    "seed": "refused when sampling (one random stream per batch); ignored when greedy",
    "logprobs": "refused (the manager returns only the sampled token's processed logprob, no alternatives)",
    "logit_bias": "refused (no per-request bias processor in the manager)",
    "presence_penalty": "refused (no per-request penalty processor)",
    "frequency_penalty": "refused (no per-request penalty processor)",
    "repetition_penalty": "refused (no per-request penalty processor)",
    "min_p": "refused (no per-request min_p processor)",
    "grammar": "per request (response_format, forced tool calls): one grammar matcher per CB request, advanced by its "
               "own tokens before each step, its mask on the request's row before sampling; the manager then runs "
               "with synchronous batching (engine/cuda/constrained.py); refused when the engine runs with "
               "structured_outputs off (async batching)",
}


class UnsupportedParameter(ValueError):
    """A sampling parameter this engine cannot honour per request. The transport maps it to 400 with ``param`` set."""

    code = "invalid_request"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def check_params(params: SamplingParams, grammars: bool = True) -> None:
    """Raise UnsupportedParameter for what the manager cannot do per request (see PARAMETER_SUPPORT). ``grammars``:
    whether this engine serves SamplingParams.grammar (CudaCBConfig.structured_outputs)."""
    refused = [
        ("logit_bias", bool(params.logit_bias)),
        ("presence_penalty", params.presence_penalty != 0.0),
        ("frequency_penalty", params.frequency_penalty != 0.0),
        ("repetition_penalty", params.repetition_penalty != 1.0),
        ("min_p", params.min_p > 0.0),
        ("logprobs", params.logprobs or params.top_logprobs > 0 or params.prompt_logprobs is not None),
        ("seed", params.seed is not None and params.temperature > 0.0),
    ]
    for name, bad in refused:
        if bad:
            raise UnsupportedParameter(name, f"not supported by the cuda-cb engine ({PARAMETER_SUPPORT[name]})")
    if params.grammar is not None and not grammars:  # named as the request field a client set to ask for it
        raise UnsupportedParameter("response_format", "not served by this cuda-cb worker: it runs with structured "
                                   "outputs off (CUDA_STRUCTURED_OUTPUTS=false, for async batching)")
    if params.n < 1 or params.max_tokens < 1:
        raise UnsupportedParameter("n" if params.n < 1 else "max_tokens", "must be at least 1")


def processor_kwargs(params: SamplingParams, vocab_size: int) -> dict[str, Any]:
    """Per-request kwargs for the manager's temperature / top-k / top-p processors (always all three, so every
    request overrides the placeholders the manager was built with)."""
    if params.temperature <= 0.0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    top_k = params.top_k if 0 < params.top_k < vocab_size else vocab_size
    return {"temperature": float(params.temperature), "top_k": int(top_k), "top_p": float(params.top_p)}
