"""Linear layers on CPU through oneDNN with their weights packed once, at engine start.

``torch.ops.mkldnn._reorder_linear_weight`` lays a weight out in oneDNN's blocked format once (what
``torch.compile``'s CPU weight freezing does); ``torch.ops.mkldnn._linear_pointwise`` then multiplies without
re-packing it on every call, as ``F.linear`` does. Measured on this 2-core EPYC (bench/RESULTS.md), SmolLM2-135M:
- all of a decode step's linear layers at 16 rows, weights cold in cache as in a real step: 35.3 → 19.6 ms (bf16);
  a single [1536, 576] product: bf16 128 → 98 µs, fp32 257 → 164 µs; prefill-sized (512 rows) 2.3 → 2.1 ms;
- in bf16 the result is bit-identical to ``F.linear``; in fp32 it differs by float noise;
- a row's result does not depend on how many rows share the call (``F.linear`` picks other kernels for 1, 2 or 5
  rows than for 16, which changes the last bits): the batch-vs-alone equality of greedy output needs that.

A weight that only its Linear uses is released after packing (the packed copy replaces it; a placeholder of the same
dtype stays as ``.weight`` so dtype checks still work). A weight shared with another module — an lm_head tied to the
input embeddings — stays, and the packed copy is extra (56 MB for SmolLM2's lm_head in bf16).

Where oneDNN is missing or the self-check at install fails, layers keep ``F.linear`` (with the fp32 ``W @ xᵀ`` form
for few rows, which was faster than ``x @ Wᵀ`` there).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("llm_worker.engine.linear")

# Off: F.linear (bench/cpu/decode_step.py's "engine-unpacked" variant measures the difference).
PACKED = True
# The row count oneDNN tunes the packed layout for: a decode step's batch (any count works, and gives the same result).
_ROWS_HINT = 16
# Unpacked fp32 path: above this many rows F.linear is as fast as W @ xᵀ.
MAX_ROWS = 64


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self._packed_dtype:  # the placeholder weight cannot serve F.linear: compute in the weight's dtype
        return _packed_forward(self, x.to(self._packed_dtype)).to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), self._packed_weight,
                                               self.bias, "none", [], "")


def _unpacked_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= MAX_ROWS and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.weight.shape[0])
    return F.linear(x, self.weight, self.bias)


def packing_works(dtype: torch.dtype) -> bool:
    """oneDNN is there and a packed product matches F.linear on a small case (1, 5 and 16 rows)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(96, 64, generator=gen) * 0.1).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT)
        for rows in (1, 5, 16):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            if not torch.allclose(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2):
                return False
        return True
    except (RuntimeError, AttributeError) as exc:
        log.warning("packed linear layers unavailable; using F.linear", extra={"error": str(exc)})
        return False


def install(model: torch.nn.Module) -> int:
    """Patch every plain nn.Linear of ``model`` (instance attributes; the class is untouched). Returns how many were
    packed. Idempotent: an engine built twice on the same model (the tests do) leaves packed layers as they are."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and not hasattr(m, "_packed_weight")]
    if not linears:
        return 0
    dtype = linears[0].weight.dtype
    if not (PACKED and packing_works(dtype)):
        for m in linears:
            m.forward = types.MethodType(_unpacked_forward, m)
        return 0
    shared = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    packed = 0
    for m in linears:
        w = m.weight
        if w.dtype != dtype or w.device.type != "cpu":
            m.forward = types.MethodType(_unpacked_forward, m)
            continue
        with torch.no_grad():
            m._packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), _ROWS_HINT)
        m._packed_dtype = w.dtype
        m.forward = types.MethodType(_packed_forward, m)
        if id(w) not in shared:
            m.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        packed += 1
    return packed
