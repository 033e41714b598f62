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

from ._triton import check_dtype, check_same_device, check_shape, choose_backend, require_triton, tl, triton


def _check(q, k_cache, v_cache, rows, lengths, scale, window):
    name = "decode_attention"
    check_dtype(name, "q", q)
    check_dtype(name, "k_cache", k_cache)
    if q.dim() != 3 or q.shape[0] == 0:
        raise ValueError(f"{name}: q must be a non-empty [B, nq, hd] tensor, got shape {list(q.shape)}")
    B, nq, hd = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != hd:
        raise ValueError(f"{name}: k_cache must be [R, nkv, S, hd = {hd}], got {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: v_cache ({list(v_cache.shape)}, {v_cache.dtype}) must match k_cache "
                         f"({list(k_cache.shape)}, {k_cache.dtype})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{name}: the caches must be contiguous")
    R, nkv, S, _ = k_cache.shape
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


def decode_attention_triton(q, k_cache, v_cache, rows, lengths, scale: float, *, window: int = 0,
                            n_splits: int | None = None) -> torch.Tensor:
    device = _check(q, k_cache, v_cache, rows, lengths, scale, window)
    require_triton(device)
    return decode_attention_torch(q, k_cache, v_cache, rows, lengths, scale, window=window)  # next step: kernel


def decode_attention(q, k_cache, v_cache, rows, lengths, scale: float, *, window: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """Attention of one new query per sequence over its cached keys; [B, nq, hd] in q's dtype."""
    if choose_backend("decode_attention", backend, q.device) == "triton":
        return decode_attention_triton(q, k_cache, v_cache, rows, lengths, scale, window=window)
    return decode_attention_torch(q, k_cache, v_cache, rows, lengths, scale, window=window)
