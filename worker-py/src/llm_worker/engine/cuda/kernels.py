"""Attention kernels of the CUDA engine and the torch references they are checked against (no Transformers import).

- ``paged_decode_triton``: split-K Triton kernel for decode batches (every sequence adds one token) that reads K/V in
  place through the paged cache's block table; ``paged_decode_reference`` is the same contract in torch (the CPU path
  and the kernel's reference). ``decode_kernel_self_test`` runs one against the other at engine start.
- ``flash_varlen``: PyTorch's built-in FlashAttention-2 varlen kernel (``aten::_flash_attention_forward``, shipped
  inside torch); ``varlen_reference`` is per-sequence SDPA with the same bottom-right causal mask;
  ``flash_varlen_self_test`` compares them.

attention.py wires these into Transformers' paged cache.
"""

from __future__ import annotations

from typing import Optional

import torch


def varlen_reference(q, k, v, cu_q, cu_k, scale):
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


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    # FlashAttention-2 varlen inside torch: GQA when heads_q % heads_kv == 0; causal is bottom-right aligned.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )[0]


# ------------------------------------------------------------------------------------------- decode fast path
# The manager's decode fast path (every sequence of the batch adds one token) hands the attention a block table
# [groups, batch, max_blocks] instead of read/write index lists: no per-token index lists are built on the host and no
# KV rows are gathered on the device. Transformers only enables it for flash-attn's ``flash_attn_with_kvcache``; the
# engine enables it for its varlen attention (attention.py) and serves it with the Triton kernel below (CUDA) or a
# torch reference (CPU).
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
        got = flash_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.125).float()
        ref = varlen_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 0.125)
        err = ((got - ref).norm() / ref.norm()).item()
        return None if err < 2e-2 else f"relative error {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to paged|sdpa
        return f"{type(e).__name__}: {e}"
