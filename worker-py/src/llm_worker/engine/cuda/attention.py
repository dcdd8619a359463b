"""The attention function the CUDA engine registers with Transformers: ``paged|torch_flash_varlen``.

``paged|sdpa`` (Transformers' default without the flash-attn package) builds a dense mask of shape [batch tokens, every
cached token] and attends every query to every cached token of the batch, so its cost grows with the square of the
batch. ``varlen_paged_attention_forward`` does the same paged cache read, then one varlen FlashAttention call over the
packed batch (kernels.py). The name contains "flash", which is what makes the manager skip the dense mask and allow
CUDA graphs.

Decode fast path: when every sequence of a batch adds one token the manager can pass a block table instead of per-token
read/write index lists (Transformers enables that only for flash-attn's ``flash_attn_with_kvcache``); the new K/V are
written into their slots here and the kernel chosen by ``use_decode_kernel`` reads the blocks in place.

This module reads the paged cache's internals (``layer_index_to_group_indices``, ``key_cache``, ``write_trash_index``):
it is covered by the Transformers version check in patches.py.
"""

from __future__ import annotations

import torch

from .kernels import DECODE_KERNELS, flash_varlen, paged_decode_reference, varlen_reference

VARLEN_ATTN = "paged|torch_flash_varlen"

_decode_kernel = {"fn": paged_decode_reference}  # set by the engine at start (use_decode_kernel)


def use_decode_kernel(name: str) -> None:
    """Serve decode-fast-path batches with ``DECODE_KERNELS[name]`` ("triton" or "reference") from now on."""
    _decode_kernel["fn"] = DECODE_KERNELS[name]


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
        out = flash_varlen(q, k.contiguous(), v.contiguous(), cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                           module.scaling)
    else:
        out = varlen_reference(q, k, v, cu_q, cu_k, module.scaling)
    return out, None


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
