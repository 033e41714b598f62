"""Decode attention over the compact KV cache: flash-decoding, GQA, optional sliding window.

q [B, nq, hd] (one new token per sequence), k_cache / v_cache [R, nkv, S, hd]; sequence b reads row
rows[b] and attends to positions [max(0, lengths[b] - window) if window else 0, lengths[b]).
Query head h uses kv head h // (nq / nkv) (transformers' repeat_kv order). Scores are scaled by `scale`.

``decode_attention_torch`` is the reference (gather, masked fp32 softmax). The Triton path splits each
sequence's key range into n_splits contiguous chunks: ``_attention_split_kernel`` runs one program per
(b, kv head, split) that reads that chunk's keys and values once for all nq / nkv query heads of the kv
head, keeping an online-softmax (max, sum, acc) per query head; ``_attention_combine_kernel`` (one program
per (b, q head)) merges the splits' partials. The number of splits depends on S, not on the lengths, so
the grid is fixed for a CUDA graph.

lengths are checked (1 <= length <= S) only for CPU tensors; on a GPU a length is clamped to S.
"""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_kv_caches, check_same_device, check_shape, choose_backend, require_triton,
                      tl, triton)


def _check(q, k_cache, v_cache, rows, lengths, scale, window):
    name = "decode_attention"
    check_dtype(name, "q", q)
    if q.dim() != 3 or q.shape[0] == 0:
        raise ValueError(f"{name}: q must be a non-empty [B, nq, hd] tensor, got shape {list(q.shape)}")
    B, nq, hd = q.shape
    R, nkv, S, _ = check_kv_caches(name, k_cache, v_cache, head_dim=hd)
    if nq % nkv:
        raise ValueError(f"{name}: nq ({nq}) must be a multiple of the cache's nkv ({nkv})")
    for what, t in (("rows", rows), ("lengths", lengths)):
        check_dtype(name, what, t, (torch.int64,))
        check_shape(name, what, t, (B,))
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{name}: window must be an int >= 0 (0 = no window), got {window!r}")
    if not scale > 0:
        raise ValueError(f"{name}: scale must be > 0, got {scale}")
    device = check_same_device(name, q=q, k_cache=k_cache, v_cache=v_cache, rows=rows, lengths=lengths)
    if device.type == "cpu":
        if lengths.min().item() < 1 or lengths.max().item() > S:
            raise ValueError(f"{name}: lengths must be in [1, S = {S}], got {lengths.tolist()}")
        if rows.min().item() < 0 or rows.max().item() >= R:
            raise ValueError(f"{name}: rows must be in [0, R = {R}), got {rows.tolist()}")
    return device


def decode_attention_torch(q, k_cache, v_cache, rows, lengths, scale: float, *, window: int = 0) -> torch.Tensor:
    """Reference: masked softmax attention in fp32 over the gathered rows; [B, nq, hd] in q's dtype."""
    _check(q, k_cache, v_cache, rows, lengths, scale, window)
    B, nq, hd = q.shape
    _, nkv, S, _ = k_cache.shape
    k = k_cache[rows].float()  # [B, nkv, S, hd]
    v = v_cache[rows].float()
    qg = q.float().reshape(B, nkv, nq // nkv, hd)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale
    pos = torch.arange(S, device=q.device)
    hi = lengths.clamp(max=S)[:, None]
    lo = (hi - window).clamp(min=0) if window else torch.zeros_like(hi)
    visible = (pos[None, :] >= lo) & (pos[None, :] < hi)  # [B, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgs,bhsd->bhgd", p, v).reshape(B, nq, hd).to(q.dtype)


if triton is not None:

    @triton.jit
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr,
                                nq, nkv, S, hd, scale_log2e, window,
                                G: tl.constexpr, G_PAD: tl.constexpr, HD_PAD: tl.constexpr,
                                BLOCK_N: tl.constexpr):
        """Program (b, kv head, split): online softmax over split `split` of sequence b's visible keys
        for the G query heads of the kv head, in base 2 (scores times scale * log2(e)).

        The visible range [lo, hi) is cut into n_splits chunks of a whole number of BLOCK_N keys each,
        from the sequence's own length, so the grid depends only on S. Partials: m, l [B * nq, n_splits]
        and acc [B * nq, n_splits, hd], fp32, unnormalized.
        """
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        row = tl.load(rows_ptr + b)
        hi = tl.minimum(tl.load(lengths_ptr + b), S)
        lo = hi * 0
        if window > 0:
            lo = tl.maximum(hi - window, 0)
        chunk = tl.cdiv(tl.cdiv(hi - lo, n_splits), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, hi)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        g_ok = g < G
        d_ok = d < hd
        heads = kvh * G + g  # [G_PAD] query heads of this kv head
        q = tl.load(q_ptr + (b * nq + heads)[:, None] * hd + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale_log2e

        m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, HD_PAD], dtype=tl.float32)
        kv_base = (row * nkv + kvh) * S * hd
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            kv_off = kv_base + n.to(tl.int64)[:, None] * hd + d[None, :]
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)       # [BLOCK_N, HD_PAD]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                           # [G_PAD, BLOCK_N]
            s = tl.where(n_ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(n_ok[None, :], tl.exp2(s - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)       # [BLOCK_N, HD_PAD]
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new

        part = (b * nq + heads) * n_splits + split  # [G_PAD]
        tl.store(m_ptr + part, m_i, mask=g_ok)
        tl.store(l_ptr + part, l_i, mask=g_ok)
        tl.store(acc_ptr + part.to(tl.int64)[:, None] * hd + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, hd,
                                  SPLITS_PAD: tl.constexpr, HD_PAD: tl.constexpr):
        """Program (b * nq + head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (0 if no key)."""
        i = tl.program_id(0).to(tl.int64)
        sp = tl.arange(0, SPLITS_PAD)
        sp_ok = sp < n_splits
        d = tl.arange(0, HD_PAD)
        d_ok = d < hd
        m = tl.load(m_ptr + i * n_splits + sp, mask=sp_ok, other=-1.0e30)
        l = tl.load(l_ptr + i * n_splits + sp, mask=sp_ok, other=0.0)
        w = tl.where(sp_ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
        total = tl.sum(w * l, axis=0)
        acc = tl.load(acc_ptr + (i * n_splits + sp)[:, None] * hd + d[None, :],
                      mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
        tl.store(out_ptr + i * hd + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def launch_config(B: int, nq: int, nkv: int, S: int, hd: int, *, sm_count: int = 132,
                  interpreted: bool = False) -> dict:
    """Key block, splits and warps for the split kernel (the one place they are chosen).

    The [G_PAD, BLOCK_N, HD_PAD] products are the largest temporaries: BLOCK_N keeps them at 4096
    values (32 fp32 a thread over 4 warps; 8192 spilled on sm_90, see targets.py), at least 8 keys. Splits: about two programs per SM in all, at most
    one per BLOCK_N keys of S and 64 in all. The interpreter gets one or two splits (programs run
    serially). The combine kernel holds [SPLITS_PAD, HD_PAD] partials: 4 warps.
    """
    g_pad = triton.next_power_of_2(nq // nkv)
    hd_pad = triton.next_power_of_2(hd)
    block_n = max(8, min(64, 4096 // (g_pad * hd_pad)))
    # 8 warps where the product or the K/V tiles alone reach 4096 values (G = 1: a 32 x 128 tile over
    # 4 warps spilled on sm_80).
    num_warps = 8 if g_pad * block_n * hd_pad > 4096 or block_n * hd_pad >= 4096 else 4
    max_splits = max(1, triton.cdiv(S, block_n))
    if interpreted:
        n_splits = min(2, max_splits)
    else:
        n_splits = max(1, min(64, max_splits, triton.cdiv(2 * sm_count, B * nkv)))
    return {"G_PAD": g_pad, "HD_PAD": hd_pad, "BLOCK_N": block_n, "n_splits": n_splits, "num_warps": num_warps,
            "combine_warps": 4}


def decode_attention_triton(q, k_cache, v_cache, rows, lengths, scale: float, *, window: int = 0,
                            n_splits: int | None = None) -> torch.Tensor:
    """The split and combine kernels; n_splits overrides the launcher's choice (tests use it)."""
    device = _check(q, k_cache, v_cache, rows, lengths, scale, window)
    require_triton(device)
    q = q.contiguous()
    B, nq, hd = q.shape
    _, nkv, S, _ = k_cache.shape
    interp = device.type == "cpu"
    cfg = launch_config(B, nq, nkv, S, hd, sm_count=1 if interp else _sm_count(device), interpreted=interp)
    if n_splits is not None:
        if not isinstance(n_splits, int) or n_splits < 1:
            raise ValueError(f"decode_attention: n_splits must be an int >= 1, got {n_splits!r}")
        cfg["n_splits"] = n_splits
    ns = cfg["n_splits"]
    m = torch.empty((B * nq, ns), dtype=torch.float32, device=device)
    l = torch.empty((B * nq, ns), dtype=torch.float32, device=device)
    acc = torch.empty((B * nq, ns, hd), dtype=torch.float32, device=device)
    out = torch.empty_like(q)
    _attention_split_kernel[(B, nkv, ns)](
        q, k_cache, v_cache, rows, lengths, m, l, acc, nq, nkv, S, hd, float(scale) * 1.4426950408889634,
        int(window), G=nq // nkv, G_PAD=cfg["G_PAD"], HD_PAD=cfg["HD_PAD"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"])
    _attention_combine_kernel[(B * nq,)](m, l, acc, out, ns, hd, SPLITS_PAD=triton.next_power_of_2(ns),
                                         HD_PAD=cfg["HD_PAD"], num_warps=cfg["combine_warps"])
    return out


def decode_attention(q, k_cache, v_cache, rows, lengths, scale: float, *, window: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """Attention of one new query per sequence over its cached keys; [B, nq, hd] in q's dtype."""
    if choose_backend("decode_attention", backend, q.device) == "triton":
        return decode_attention_triton(q, k_cache, v_cache, rows, lengths, scale, window=window)
    return decode_attention_torch(q, k_cache, v_cache, rows, lengths, scale, window=window)
