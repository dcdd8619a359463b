"""GPU engine: Transformers' own continuous batching (paged KV cache, per-request sampling) behind our ``Engine``.

The manager from ``model.init_continuous_batching`` owns the scheduler, the paged cache and a generation thread. This
engine adds what the worker needs around it: one CB request per choice (``n`` > 1 shares the prompt's full blocks
through the manager's prefix sharing), per-request sampling mapped onto the manager's per-request logits processors,
an emitter thread that coalesces every token available since the last pass into one ``emit`` per request,
cancellation and deadlines (``cancel_request`` frees the sequence's blocks at the next step), and a cache sized from
the memory actually free (Transformers' own sizing assumes a GPU and sizes for most of the host's RAM on CPU).

Attention: ``paged|sdpa`` (Transformers' default without the flash-attn package) builds a dense mask of shape
[batch tokens, every cached token] and attends every query to every cached token of the batch, so its cost grows with
the square of the batch. On CUDA we register ``paged|torch_flash_varlen``: the same paged cache read, then PyTorch's
built-in FlashAttention-2 varlen kernel (``aten::_flash_attention_forward``), which ships inside torch and needs no
download. The name contains "flash", which is what makes the manager skip the dense mask and allow CUDA graphs.

Decode fast path: when every sequence of a batch adds one token, the manager can pass a block table instead of
per-token read/write index lists, but Transformers enables that only for flash-attn's ``flash_attn_with_kvcache``. The
engine turns it on for VARLEN_ATTN and serves it with its own split-K Triton kernel that reads K/V in place through the
block table (``paged_decode_triton``; self-tested against a torch reference at start, CPU runs use the reference). That
removes the host-side index lists (~150k entries per step at 512 sequences) and the per-layer KV gather.

Sampling: the manager's per-request temperature / top-k / top-p processors sort the whole vocabulary twice per row per
step even when a request needs neither. ``install_fast_sampling`` keeps their per-request arguments but picks the work per
batch on the host (the choice is part of the CUDA-graph key): all-greedy batches take an argmax, batches without top-k /
top-p only scale by temperature, the others do one sort for both filters (same kept set as Transformers' processors).

What the manager cannot do per request is refused by ``check_params`` / ``submit`` with ``UnsupportedParameter``
(code ``invalid_request``): logit_bias, presence/frequency/repetition penalties, min_p, logprobs, and a seed when
sampling (the manager has one random stream for the whole batch). See ``PARAMETER_SUPPORT``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .base import ChoiceOutput, EmitFn, Engine, EngineStats, GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)

VARLEN_ATTN = "paged|torch_flash_varlen"

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
    "grammar": "refused for now (response_format): not wired into this engine yet; the manager samples inside its own "
               "step, and a per-row mask needs each row's grammar state advanced by its previous token first",
}


class UnsupportedParameter(ValueError):
    """A sampling parameter this engine cannot honour per request. The transport maps it to 400 with ``param`` set."""

    code = "invalid_request"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


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


# ----------------------------------------------------------------------------------------------- attention function
def _varlen_reference(q, k, v, cu_q, cu_k, scale):
    """Per-sequence SDPA with a bottom-right causal mask: the CPU path and the GPU self-test's reference."""
    out = torch.empty_like(q)
    n_rep = q.shape[1] // k.shape[1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe <= qs:
            continue
        qi = q[qs:qe].transpose(0, 1)  # [H, lq, D]
        ki = k[ks:ke].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        vi = v[ks:ke].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        lq, lk = qe - qs, ke - ks
        # query j sits at absolute position (lk - lq + j): it sees keys 0..lk-lq+j (queries are the last tokens)
        mask = torch.arange(lk, device=q.device)[None, :] <= (torch.arange(lq, device=q.device)[:, None] + lk - lq)
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    # FlashAttention-2 varlen inside torch: GQA when heads_q % heads_kv == 0; causal is bottom-right aligned.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )[0]


# ------------------------------------------------------------------------------------------- decode fast path
# The manager's decode fast path (every sequence of the batch adds one token) hands the attention a block table
# [groups, batch, max_blocks] instead of read/write index lists: no per-token index lists are built on the host and no
# KV rows are gathered on the device. Transformers only enables it for flash-attn's ``flash_attn_with_kvcache``; the
# engine enables it for VARLEN_ATTN and serves it with the Triton kernel below (CUDA) or a torch reference (CPU).
_TRITON_KERNELS = None


def _triton_kernels():
    """Split-K paged decode attention (GQA): program (sequence, kv head, split) reads its share of the sequence's blocks
    through the block table with an online softmax; a second kernel merges the splits."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is not None:
        return _TRITON_KERNELS
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["S", "trash_block"])
    def _split_kernel(Q, K, V, BT, LENS, MO, MM, ML, stride_qb, stride_qh, stride_kr, stride_kh, stride_btb,
                      stride_mob, stride_moh, stride_mos, stride_mmb, stride_mmh, scale, trash_block, S,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        seqlen = tl.load(LENS + b)
        nblk = tl.cdiv(seqlen, BS)
        per = tl.cdiv(nblk, S)
        lo = s * per
        hi = tl.minimum(lo + per, nblk)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        gmask = g < G
        qh = kvh * G + g
        q = tl.load(Q + b * stride_qb + qh[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for blk in range(lo, hi):
            page = tl.load(BT + b * stride_btb + blk)
            page = tl.where(page < 0, trash_block, page)
            rows = page.to(tl.int64) * BS + t
            kmask = (blk * BS + t) < seqlen
            offs = rows[:, None] * stride_kr + kvh * stride_kh + d[None, :]
            k = tl.load(K + offs, mask=kmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * scale
            qk = tl.where(kmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs, mask=kmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        mo = MO + b * stride_mob + qh[:, None] * stride_moh + s * stride_mos + d[None, :]
        tl.store(mo, acc, mask=gmask[:, None])
        tl.store(MM + b * stride_mmb + qh * stride_mmh + s, m_i, mask=gmask)
        tl.store(ML + b * stride_mmb + qh * stride_mmh + s, l_i, mask=gmask)

    @triton.jit(do_not_specialize=["S"])
    def _reduce_kernel(MO, MM, ML, O, stride_mob, stride_moh, stride_mos, stride_mmb, stride_mmh, stride_ob,
                       stride_oh, S, D: tl.constexpr, SP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        smask = s < S
        m = tl.load(MM + b * stride_mmb + h * stride_mmh + s, mask=smask, other=float("-inf"))
        l = tl.load(ML + b * stride_mmb + h * stride_mmh + s, mask=smask, other=0.0)
        valid = m > float("-inf")
        big = tl.max(m, 0)
        w = tl.where(valid, tl.exp(m - big), 0.0)
        acc = tl.load(MO + b * stride_mob + h * stride_moh + s[:, None] * stride_mos + d[None, :],
                      mask=(smask & valid)[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))

    _TRITON_KERNELS = (_split_kernel, _reduce_kernel)
    return _TRITON_KERNELS


_MAX_SPLITS = 32
_NUM_SMS: dict = {}


def paged_decode_triton(q, k_cache, v_cache, block_table, seqlens, scale, block_size, trash_block):
    """q [B, Hq, D]; k_cache / v_cache [rows, Hkv, D] (row = block * block_size + offset); block_table [B, MB] int32
    (-1: none, read as ``trash_block``); seqlens [B] int32 >= 1, the new token included and already written.
    Returns [B, Hq, D]. The split count depends only on B, so a CUDA graph per padded batch size stays valid."""
    split_kernel, reduce_kernel = _triton_kernels()
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    GP = max(16, 1 << (G - 1).bit_length())
    dev = q.device.index if q.device.index is not None else 0
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    S = max(1, min(_MAX_SPLITS, (2 * _NUM_SMS[dev]) // max(1, B * Hkv)))
    mo = torch.empty((B, Hq, S, D), device=q.device, dtype=torch.float32)
    mm = torch.empty((B, Hq, S), device=q.device, dtype=torch.float32)
    ml = torch.empty((B, Hq, S), device=q.device, dtype=torch.float32)
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    split_kernel[(B, Hkv, S)](q, k_cache, v_cache, block_table, seqlens, mo, mm, ml, q.stride(0), q.stride(1),
                              k_cache.stride(0), k_cache.stride(1), block_table.stride(0), mo.stride(0), mo.stride(1),
                              mo.stride(2), mm.stride(0), mm.stride(1), scale, trash_block, S, G=G, GP=GP, D=D,
                              BS=block_size, num_warps=4)
    reduce_kernel[(B, Hq)](mo, mm, ml, out, mo.stride(0), mo.stride(1), mo.stride(2), mm.stride(0), mm.stride(1),
                           out.stride(0), out.stride(1), S, D=D, SP=_MAX_SPLITS, num_warps=4)
    return out


def paged_decode_reference(q, k_cache, v_cache, block_table, seqlens, scale, block_size, trash_block):
    """Same contract as ``paged_decode_triton``, one SDPA per sequence (the CPU path and the kernel's reference)."""
    B, Hq, _ = q.shape
    n_rep = Hq // k_cache.shape[1]
    out = torch.empty_like(q)
    lens = seqlens.tolist()
    table = block_table.tolist()
    offsets = torch.arange(block_size, device=q.device)
    for b in range(B):
        n = int(lens[b])
        pages = [p if p >= 0 else trash_block for p in table[b][: (n + block_size - 1) // block_size]]
        rows = (torch.tensor(pages, device=q.device)[:, None] * block_size + offsets).reshape(-1)[:n]
        k = k_cache[rows].transpose(0, 1).repeat_interleave(n_rep, dim=0)  # [Hq, n, D]
        v = v_cache[rows].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(q[b].unsqueeze(1).to(k.dtype), k, v, scale=scale)
        out[b] = o.squeeze(1).to(q.dtype)
    return out


DECODE_KERNELS = {"triton": paged_decode_triton, "reference": paged_decode_reference}
_decode_kernel = {"fn": paged_decode_reference}  # set by the engine at start


def _paged_decode_forward(module, query, key, value, cache, cu_seq_lens_k, block_table):
    """query [1, Hq, B, D], key/value [1, Hkv, B, D]: one new token per sequence. Writes it into its slot (padding
    sequences write to the cache's write-trash row), then attends over each sequence's blocks."""
    group_idx, layer_idx_in_group = cache.layer_index_to_group_indices[module.layer_idx]
    k_cache, v_cache = cache.key_cache[layer_idx_in_group], cache.value_cache[layer_idx_in_group]
    bs = cache.block_size
    q = query[0].transpose(0, 1).contiguous()  # [B, Hq, D]
    k = key[0].transpose(0, 1).to(k_cache.dtype)  # [B, Hkv, D]
    v = value[0].transpose(0, 1).to(v_cache.dtype)
    batch = q.shape[0]
    table = block_table[group_idx][:batch]  # [B, MB] int32
    lens = (cu_seq_lens_k[1: batch + 1] - cu_seq_lens_k[:batch]).to(torch.int64)  # incl. the new token; padding: 0
    pos = (lens - 1).clamp(min=0)
    page = table.gather(1, (pos // bs).unsqueeze(1)).squeeze(1).to(torch.int64)
    slot = torch.where((lens > 0) & (page >= 0), page * bs + pos % bs,
                       torch.full_like(page, cache.write_trash_index))
    k_cache.index_copy_(0, slot, k)
    v_cache.index_copy_(0, slot, v)
    out = _decode_kernel["fn"](q, k_cache, v_cache, table, lens.clamp(min=1).to(torch.int32), module.scaling, bs,
                               cache.num_blocks)
    return out


def varlen_paged_attention_forward(module, query, key, value, attention_mask, cache=None, cu_seq_lens_q=None,
                                   cu_seq_lens_k=None, max_seqlen_q=None, max_seqlen_k=None, block_table=None,
                                   **kwargs):
    """Attention over Transformers' paged cache without a dense mask: write the new K/V, read each sequence's K/V,
    then one varlen FlashAttention call over the packed batch (query: [1, H, T, D] → output [T, H, D]). With a block
    table (decode fast path) the new K/V go to their slots and the decode kernel reads the blocks in place."""
    if cache is None:
        raise ValueError(f"{VARLEN_ATTN} runs only inside continuous batching (no paged cache given)")
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k["full_attention"], max_seqlen_k["full_attention"]
    if block_table is not None:
        return _paged_decode_forward(module, query, key, value, cache, cu_seq_lens_k, block_table), None
    k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                        read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    q = query.transpose(1, 2).squeeze(0).contiguous()
    cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
    if q.is_cuda:
        out = _flash_varlen(q, k.contiguous(), v.contiguous(), cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                            module.scaling)
    else:
        out = _varlen_reference(q, k, v, cu_q, cu_k, module.scaling)
    return out, None


def decode_kernel_self_test(device: torch.device, dtype: torch.dtype, name: str = "triton") -> Optional[str]:
    """Run a decode kernel against the reference on random paged data (GQA 28/4, head 128, uneven lengths, unused
    table entries). None when it agrees."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        bs, nblocks, hkv, hq, d = 64, 24, 4, 28, 128
        kc = torch.randn((nblocks + 2) * bs, hkv, d, generator=g).to(device, dtype)
        vc = torch.randn((nblocks + 2) * bs, hkv, d, generator=g).to(device, dtype)
        lens = [1, 70, 200, 64, 333]
        table = torch.full((len(lens), 8), -1, dtype=torch.int32)
        perm = torch.randperm(nblocks, generator=g).tolist()
        used = 0
        for b, n in enumerate(lens):
            nb = (n + bs - 1) // bs
            table[b, :nb] = torch.tensor(perm[used: used + nb])
            used += nb
        q = torch.randn(len(lens), hq, d, generator=g).to(device, dtype)
        table, seq = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
        got = DECODE_KERNELS[name](q, kc, vc, table, seq, d ** -0.5, bs, nblocks).float()
        ref = paged_decode_reference(q.float(), kc.float(), vc.float(), table, seq, d ** -0.5, bs, nblocks)
        err = ((got - ref).norm() / ref.norm()).item()
        return None if err < 2e-2 else f"relative error {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: no decode fast path
        return f"{type(e).__name__}: {e}"


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_paged_attention_forward)


def set_attention(model, implementation: str) -> None:
    """Switch the model's attention. Ours is set on the configs directly: ``set_attn_implementation`` would try to
    import a flash-attn package for any name containing "flash"."""
    if implementation != VARLEN_ATTN:
        model.set_attn_implementation(implementation)
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = implementation


def flash_varlen_self_test(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run the CUDA kernel against the reference on random data (GQA, q shorter than k). None when it agrees."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        lq, lk = [5, 1, 17], [9, 33, 17]
        q = torch.randn(sum(lq), 8, 64, generator=g).to(device, dtype)
        k = torch.randn(sum(lk), 2, 64, generator=g).to(device, dtype)
        v = torch.randn(sum(lk), 2, 64, generator=g).to(device, dtype)
        cu_q = torch.tensor([0, 5, 6, 23], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 9, 42, 59], dtype=torch.int32, device=device)
        got = _flash_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.125).float()
        ref = _varlen_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 0.125)
        err = ((got - ref).norm() / ref.norm()).item()
        return None if err < 2e-2 else f"relative error {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to paged|sdpa
        return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------- sampling
GREEDY, PLAIN, PLAIN_G, FULL, FULL_G = "greedy", "plain", "plain+greedy", "full", "full+greedy"


def install_fast_sampling(logit_processor, vocab_size: int) -> bool:
    """Turn the manager's per-request temperature / top-k / top-p processor list into one whose work is chosen per
    batch on the host (see ``FastSamplingList``). False (nothing changed) when the list is not the expected three."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
        ContinuousBatchingTemperatureLogitsWarper,
        ContinuousBatchingTopKLogitsWarper,
        ContinuousBatchingTopPLogitsWarper,
    )

    if not isinstance(logit_processor, ContinuousBatchingLogitsProcessorList):
        return False
    kinds = [ContinuousBatchingTemperatureLogitsWarper, ContinuousBatchingTopKLogitsWarper,
             ContinuousBatchingTopPLogitsWarper]
    procs = list(logit_processor.logits_processor)
    if len(procs) != 3 or sorted(type(p).__name__ for p in procs) != sorted(k.__name__ for k in kinds):
        return False
    index = {kind: next(i for i, p in enumerate(procs) if isinstance(p, kind)) for kind in kinds}

    class FastSamplingList(type(logit_processor)):
        """The manager's processor list, with ``__call__`` doing only what the batch needs. The batch's mode is computed
        on the host when its tensors are prepared (``mode_for``), is part of the CUDA-graph key, and is read when the
        step is traced or run eagerly: greedy (argmax, no softmax), plain (temperature; greedy rows masked to their
        argmax; no sort), full (plain + one descending sort serving both top-k and top-p)."""

        def mode_for(self, requests_in_batch) -> str:
            any_greedy = any_sampled = any_filter = False
            for fs in requests_in_batch:
                if not fs.has_new_token:
                    continue
                kw = fs.state.logit_processor_kwargs
                top_k = max(int(kw.get("top_k", self._fs_defaults[1])), 1)
                if top_k == 1:
                    any_greedy = True
                    continue
                any_sampled = True
                if top_k < self._fs_vocab or float(kw.get("top_p", self._fs_defaults[2])) < 1.0:
                    any_filter = True
            if not any_sampled:
                return GREEDY
            if any_filter:
                return FULL_G if any_greedy else FULL
            return PLAIN_G if any_greedy else PLAIN

        def __call__(self, input_ids, scores, logits_processor_args):
            mode = self.active_mode
            if mode is None:
                return super().__call__(input_ids, scores, logits_processor_args)
            if mode == GREEDY:
                return scores  # the runner takes the argmax (do_sample is off for this mode)
            i_t, i_k, i_p = self._fs_index
            rows, vocab = scores.shape
            temperature = logits_processor_args[i_t][:rows].view(dtype=torch.float32)
            top_k = logits_processor_args[i_k][:rows]
            scores = scores / temperature.unsqueeze(-1)
            if mode in (PLAIN_G, FULL_G):  # greedy rows (top_k == 1): everything but the argmax is filtered out
                greedy = (top_k <= 1).unsqueeze(-1)
                best = scores.argmax(dim=-1, keepdim=True)
                drop = greedy & (torch.arange(vocab, device=scores.device).unsqueeze(0) != best)
                scores = scores.masked_fill(drop, float("-inf"))
            if mode in (FULL, FULL_G):
                top_p = logits_processor_args[i_p][:rows].view(dtype=torch.float32)
                ranked = torch.sort(scores, dim=-1, descending=True)[0]  # one sort for top-k and top-p
                kth = ranked.gather(1, (top_k.clamp(1, vocab) - 1).to(torch.int64).unsqueeze(-1))
                ranked = ranked.masked_fill(ranked < kth, float("-inf"))  # top-k (ties with the k-th kept)
                probs = ranked.softmax(dim=-1)
                # top-p as in Transformers: drop a token when the probability mass at or below it is <= 1 - top_p
                mass_at_or_below = probs.flip(-1).cumsum(dim=-1).flip(-1)  # summed from the smallest, as there
                drop = mass_at_or_below <= (1.0 - top_p).unsqueeze(-1)
                drop[:, 0] = False
                keep = (~drop).sum(dim=-1, keepdim=True)
                threshold = torch.maximum(kth, ranked.gather(1, keep - 1))
                scores = scores.masked_fill(scores < threshold, float("-inf"))
            return scores

    logit_processor.__class__ = FastSamplingList
    logit_processor.active_mode = None
    logit_processor._fs_index = (index[kinds[0]], index[kinds[1]], index[kinds[2]])
    logit_processor._fs_defaults = (procs[index[kinds[0]]].temperature, procs[index[kinds[1]]].top_k,
                                    procs[index[kinds[2]]].top_p)
    logit_processor._fs_vocab = vocab_size
    return True


def hook_fast_sampling(batch_processor) -> None:
    """Wire a ``FastSamplingList`` into the batch processor (instance attributes only): each host IO records its
    batch's mode when it prepares the batch, each device IO adds that mode to its CUDA-graph key, and the model runner
    sets the processor's mode (and argmax vs sampling) before each step."""
    lp = batch_processor.logit_processor
    ios = batch_processor.inputs_and_outputs
    pairs = [(p.host_io, p.device_io) for p in ios.io_pairs] if hasattr(ios, "io_pairs") else [(ios, ios)]
    for host, device in pairs:
        host.sampling_mode = FULL_G

        def prepare(requests_in_batch, logits_processors, *args, _host=host, _orig=host.prepare_batch_tensors,
                    **kwargs):
            _host.sampling_mode = lp.mode_for(requests_in_batch)
            return _orig(requests_in_batch, logits_processors, *args, **kwargs)

        def graph_key(_host=host, _orig=device._get_graph_key):
            return (*_orig(), _host.sampling_mode)

        host.prepare_batch_tensors = prepare
        device._get_graph_key = graph_key
    runner = batch_processor.model_runner
    sample_default = runner.do_sample

    def current_host():
        return ios.io_pairs[ios.current_pair].host_io if hasattr(ios, "io_pairs") else ios

    def compute_batch(model, batch_data, _orig=runner.compute_batch):
        lp.active_mode = current_host().sampling_mode
        runner.do_sample = sample_default and lp.active_mode != GREEDY
        return _orig(model, batch_data)

    runner.compute_batch = compute_batch


# ----------------------------------------------------------------------------------------------------------- engine
_WAKE = object()  # put on the manager's output queue to wake the emitter (cancel, stop)


@dataclass
class _Choice:
    cb_id: str
    index: int
    sent: int = 0  # tokens already emitted
    done: bool = False


@dataclass
class _Request:
    request: GenerationRequest
    emit: EmitFn
    choices: list[_Choice]
    eos: frozenset[int]


def check_params(params: SamplingParams) -> None:
    """Raise UnsupportedParameter for what the manager cannot do per request (see PARAMETER_SUPPORT)."""
    refused = [
        ("logit_bias", bool(params.logit_bias)),
        ("presence_penalty", params.presence_penalty != 0.0),
        ("frequency_penalty", params.frequency_penalty != 0.0),
        ("repetition_penalty", params.repetition_penalty != 1.0),
        ("min_p", params.min_p > 0.0),
        ("logprobs", params.logprobs or params.top_logprobs > 0),
        ("seed", params.seed is not None and params.temperature > 0.0),
        ("grammar", params.grammar is not None),
    ]
    wire_name = {"grammar": "response_format"}  # the request field a client set to ask for it
    for name, bad in refused:
        if bad:
            raise UnsupportedParameter(wire_name.get(name, name),
                                       f"not supported by the cuda-cb engine ({PARAMETER_SUPPORT[name]})")
    if params.n < 1 or params.max_tokens < 1:
        raise UnsupportedParameter("n" if params.n < 1 else "max_tokens", "must be at least 1")


def processor_kwargs(params: SamplingParams, vocab_size: int) -> dict[str, Any]:
    """Per-request kwargs for the manager's temperature / top-k / top-p processors (always all three, so every
    request overrides the placeholders the manager was built with)."""
    if params.temperature <= 0.0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    top_k = params.top_k if 0 < params.top_k < vocab_size else vocab_size
    return {"temperature": float(params.temperature), "top_k": int(top_k), "top_p": float(params.top_p)}


class CudaContinuousBatchingEngine(Engine):
    """``Engine`` over ``model.init_continuous_batching``. ``model`` is a loaded causal LM (CUDA or CPU)."""

    def __init__(self, model, config: Optional[CudaCBConfig] = None, eos_token_ids=None,
                 max_batch: Optional[int] = None, context_length: Optional[int] = None):
        """``eos_token_ids``: None = the model's generation config. ``max_batch`` caps the sequences per forward pass
        (the manager's max_requests_per_batch) unless the config sets it. ``context_length`` is informational: the
        transport enforces prompt + max_tokens <= context_length before submit."""
        self.model = model
        self.config = config or CudaCBConfig()
        if max_batch is not None and self.config.max_requests_per_batch is None:
            self.config = replace(self.config, max_requests_per_batch=max_batch)
        self.context_length = context_length
        self.device = model.device
        self.vocab_size = model.config.get_text_config().vocab_size
        eos = eos_token_ids if eos_token_ids is not None else model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = frozenset(i for i in eos if i is not None and i >= 0)
        self.attn_implementation = self._choose_attention()
        self.decode_path: Optional[str] = None
        self.fast_sampling = False
        self.manager = None
        self._requests: dict[str, _Request] = {}
        self._by_cb_id: dict[str, tuple[_Request, _Choice]] = {}
        self._lock = threading.Lock()
        self._cancels: "queue.SimpleQueue[str]" = queue.SimpleQueue()  # request ids, handled on the emitter thread
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._generated_total = 0
        self.cache_info: dict[str, Any] = {}
        self.last_error: Optional[str] = None

    # ----------------------------------------------------------------------------------------------- start / stop
    def _choose_attention(self) -> str:
        wanted = self.config.attn_implementation
        if wanted == "auto":
            wanted = VARLEN_ATTN if self.device.type == "cuda" else "paged|sdpa"
        if wanted == VARLEN_ATTN:
            register_varlen_attention()
            if self.device.type == "cuda":
                problem = flash_varlen_self_test(self.device, self.model.dtype)
                if problem is not None:
                    logger.warning("flash varlen self-test failed (%s): falling back to paged|sdpa", problem)
                    wanted = "paged|sdpa"
        return wanted

    def _cb_config(self):
        from transformers import ContinuousBatchingConfig

        c, on_cuda = self.config, self.device.type == "cuda"
        max_batch_tokens = c.max_batch_tokens or (2048 if on_cuda else 256)
        num_blocks = c.num_blocks if c.num_blocks is not None else (None if on_cuda else self._cpu_num_blocks())
        kwargs = dict(block_size=c.block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                      max_memory_percent=c.memory_fraction, max_requests_per_batch=c.max_requests_per_batch,
                      per_request_processors=True, seed=c.seed, allow_block_sharing=True)
        if c.use_cuda_graph is not None or not on_cuda:
            kwargs["use_cuda_graph"] = bool(c.use_cuda_graph) and on_cuda
        if c.use_async_batching is not None or not on_cuda:
            kwargs["use_async_batching"] = bool(c.use_async_batching) and on_cuda
        if c.q_padding_interval_size:
            kwargs["q_padding_interval_size"] = c.q_padding_interval_size
        if c.kv_padding_interval_size:
            kwargs["kv_padding_interval_size"] = c.kv_padding_interval_size
        return ContinuousBatchingConfig(**kwargs)

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize

    def _cpu_num_blocks(self) -> int:
        budget = self.config.cpu_cache_bytes
        if budget is None:
            try:
                import psutil

                budget = min(int(psutil.virtual_memory().available * 0.25), 2 << 30)
            except ImportError:
                budget = 256 << 20
        return max(4, budget // (self.config.block_size * self.kv_bytes_per_token()))

    def start(self) -> None:
        from transformers import GenerationConfig

        if self.manager is not None:
            return
        set_attention(self.model, self.attn_implementation)
        # Placeholder values only make the manager build the three per-request processors; every request overrides them.
        gen_config = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=16,
                                      eos_token_id=sorted(self.eos_token_ids) or -1,
                                      pad_token_id=self.model.generation_config.pad_token_id)
        self.manager = self.model.init_continuous_batching(generation_config=gen_config,
                                                           continuous_batching_config=self._cb_config())
        # Decode fast path: Transformers enables it only for flash-attn's kernels; ours serves the block table instead.
        self.decode_path = self._choose_decode_path()
        if self.decode_path is not None:
            _decode_kernel["fn"] = DECODE_KERNELS[self.decode_path]
            self.manager.continuous_batching_config.max_blocks_per_request = self._max_blocks_per_request()
        self.fast_sampling = bool(self.config.fast_sampling) and install_fast_sampling(self.manager.logit_processor,
                                                                                     self.vocab_size)
        # Allocate the paged cache now and zero it: the manager's warm-up attends over the whole (torch.empty) cache,
        # and NaN bit patterns left in reused GPU memory then reach multinomial sampling, a device-side assert that
        # kills the CUDA context. (Private API; the manager reuses this processor in start().)
        self.manager.batch_processor = self.manager._create_batch_processor()
        if self.fast_sampling:
            hook_fast_sampling(self.manager.batch_processor)
        cache = self.manager.batch_processor.cache
        for tensor in list(cache.key_cache) + list(cache.value_cache):
            tensor.zero_()
        if self.config.warmup:
            self.manager.warmup()
        self.manager.start()
        self._wait_for_cache()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="cuda-cb-emitter", daemon=True)
        self._thread.start()

    def _choose_decode_path(self) -> Optional[str]:
        name = self.config.decode_path
        if self.attn_implementation != VARLEN_ATTN or name == "off":
            return None
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "reference"
        if name not in DECODE_KERNELS:
            raise ValueError(f"decode_path must be auto, triton, reference or off, not {name!r}")
        if name == "triton":
            problem = ("needs CUDA" if self.device.type != "cuda"
                       else decode_kernel_self_test(self.device, self.model.dtype, "triton"))
            if problem is not None:
                logger.warning("triton paged decode kernel unavailable (%s): decode batches take the varlen path",
                               problem)
                return None
        return name

    def _max_blocks_per_request(self) -> int:
        if self.config.max_blocks_per_request is not None:
            return int(self.config.max_blocks_per_request)
        cfg = self.model.config.get_text_config()
        context = self.context_length or getattr(cfg, "max_position_embeddings", None) or 32768
        return min(1024, -(-int(context) // self.config.block_size) + 1)

    def _wait_for_cache(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while self.manager.batch_processor is None:
            if self.manager.background_thread_status.fatal_error is not None or time.monotonic() > end:
                raise RuntimeError(f"continuous batching failed to start: {self.manager.background_thread_status.fatal_error}")
            time.sleep(0.01)
        bp = self.manager.batch_processor
        cfg = self.manager.continuous_batching_config
        self.cache_info = {
            "attn_implementation": self.attn_implementation, "num_blocks": bp.cache.num_blocks,
            "block_size": bp.cache.block_size, "max_batch_tokens": bp.cache.max_batch_tokens,
            "kv_cache_capacity_bytes": bp.cache.num_blocks * bp.cache.block_size * self.kv_bytes_per_token(),
            "use_cuda_graph": list(cfg.cuda_graph_booleans), "use_async_batching": bool(cfg.use_async_batching),
            "max_requests_per_batch": cfg.max_requests_per_batch,
            "decode_path": self.decode_path, "max_blocks_per_request": bp.cache.max_blocks_per_request,
            "fast_sampling": self.fast_sampling,
        }
        logger.info("cuda-cb engine ready: %s", self.cache_info)

    def stop(self) -> None:
        if self.manager is None:
            return
        with self._lock:
            ids = list(self._requests)
        for rid in ids:
            self.cancel(rid)
        deadline = time.monotonic() + 5.0
        while self._requests and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.01)
        self._stopping.set()
        self.manager.output_router.output_queue.put(_WAKE)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.manager.stop(block=True, timeout=10.0)
        self.manager.destroy()
        self.manager = None

    # ------------------------------------------------------------------------------------------ submit / cancel
    def check_params(self, params: SamplingParams) -> None:
        check_params(params)

    def submit(self, request: GenerationRequest, emit: EmitFn) -> None:
        """Raises UnsupportedParameter at once (nothing queued) for parameters this engine cannot honour."""
        check_params(request.params)
        if self.manager is None:
            raise RuntimeError("engine not started")
        self._add(request, emit)  # the manager's input queue is thread-safe: no hop through our thread

    def cancel(self, request_id: str) -> None:
        self._cancels.put(request_id)
        if self.manager is not None:
            self.manager.output_router.output_queue.put(_WAKE)  # wake the emitter now

    def stats(self) -> EngineStats:
        bp = self.manager.batch_processor if self.manager is not None else None
        if bp is None:
            return EngineStats(0, len(self._requests), 0, 0, self._generated_total)
        used_blocks = bp.cache.num_blocks - bp.cache.get_num_free_blocks()
        return EngineStats(
            running_sequences=len(bp.scheduler.active_requests),
            waiting_requests=len(bp.scheduler.waiting_requests) + self.manager.input_queue.qsize(),
            batch_size_last_step=int(getattr(bp.inputs_and_outputs, "num_request_in_batch", 0) or 0),
            kv_cache_bytes=used_blocks * bp.cache.block_size * self.kv_bytes_per_token(),
            generated_tokens_total=self._generated_total,
        )

    # ------------------------------------------------------------------------------------------ emitter thread
    def _add(self, request: GenerationRequest, emit: EmitFn) -> None:
        p = request.params
        choices = [_Choice(f"{request.request_id}#{i}", i) for i in range(p.n)]
        entry = _Request(request, emit, choices, frozenset() if p.ignore_eos else self.eos_token_ids)
        with self._lock:
            self._requests[request.request_id] = entry
            for ch in choices:
                self._by_cb_id[ch.cb_id] = (entry, ch)
        eos = -1 if p.ignore_eos or not self.eos_token_ids else sorted(self.eos_token_ids)
        kwargs = processor_kwargs(p, self.vocab_size)
        for ch in choices:
            self.manager.add_request(list(request.prompt_ids), request_id=ch.cb_id, max_new_tokens=p.max_tokens,
                                     streaming=True, eos_token_id=eos, **kwargs)

    def _finish(self, entry: _Request, reason: str) -> None:
        """End every unfinished choice of a request with ``reason`` and free its cache blocks."""
        outs = []
        for ch in entry.choices:
            if not ch.done:
                ch.done = True
                self.manager.cancel_request(ch.cb_id)
                outs.append(ChoiceOutput(ch.index, [], finish_reason=reason))
        self._forget(entry)
        if outs:
            entry.emit(entry.request.request_id, outs)

    def _forget(self, entry: _Request) -> None:
        with self._lock:
            self._requests.pop(entry.request.request_id, None)
            for ch in entry.choices:
                self._by_cb_id.pop(ch.cb_id, None)

    def _drain_cancels(self) -> None:
        while True:
            try:
                request_id = self._cancels.get_nowait()
            except queue.Empty:
                return
            entry = self._requests.get(request_id)
            if entry is not None:
                self._finish(entry, "cancelled")

    def _collect(self, timeout: float) -> dict[str, Any]:
        """Latest output of each CB request that produced something; waits up to ``timeout`` for the first one."""
        out_q = self.manager.output_router.output_queue
        latest: dict[str, Any] = {}
        try:
            item = out_q.get(timeout=timeout)
        except queue.Empty:
            return latest
        while True:
            if item is not _WAKE:
                latest[item.request_id] = item  # outputs carry all tokens so far: the newest one is enough
            try:
                item = out_q.get_nowait()
            except queue.Empty:
                return latest

    def _deliver(self, latest: dict[str, Any]) -> None:
        per_request: dict[str, list[ChoiceOutput]] = {}
        entries: dict[str, _Request] = {}
        for cb_id, out in latest.items():
            found = self._by_cb_id.get(cb_id)
            if found is None:
                continue  # cancelled or cut: its final emit was already sent
            entry, ch = found
            tokens = out.generated_tokens[ch.sent:]
            reason = None
            if out.error is not None:
                self.last_error = out.error
                logger.error("request %s failed in the CB manager: %s", cb_id, out.error)
                reason = "cancelled"
            elif out.is_finished():
                last = out.generated_tokens[-1] if out.generated_tokens else None
                reason = "stop" if last is not None and last in entry.eos else "length"
            if not tokens and reason is None:
                continue
            ch.sent = len(out.generated_tokens)
            if reason == "stop":
                tokens = tokens[:-1]  # the EOS token is not part of the text
            self._generated_total += len(tokens)
            if reason is not None:
                ch.done = True
            per_request.setdefault(entry.request.request_id, []).append(ChoiceOutput(ch.index, tokens, None, reason))
            entries[entry.request.request_id] = entry
        for rid, outs in per_request.items():
            entry = entries[rid]
            if all(ch.done for ch in entry.choices):
                self._forget(entry)
            try:
                entry.emit(rid, outs)
            except Exception:  # noqa: BLE001 - a broken emit must not stop the engine thread
                logger.exception("emit failed for request %s", rid)

    def _cut_deadlines(self) -> None:
        now = time.time()
        for entry in list(self._requests.values()):
            if entry.request.deadline is not None and now >= entry.request.deadline:
                self._finish(entry, "length")

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_cancels()
                if self.manager.background_thread_status.fatal_error is not None and self._requests:
                    self.last_error = str(self.manager.background_thread_status.fatal_error)
                    for entry in list(self._requests.values()):
                        self._finish(entry, "cancelled")
                self._deliver(self._collect(timeout=0.02))
                self._cut_deadlines()
            except Exception:  # noqa: BLE001 - keep serving the other requests
                logger.exception("cuda-cb emitter loop error")
                time.sleep(0.01)
