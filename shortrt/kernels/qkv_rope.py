"""The decode front of attention: q|k|v projection, optional q/k RMSNorm, RoPE, KV-cache write.

For B decode tokens, x [B, d] and w_qkv [(nq + 2 nkv) * hd, d] (rows: q heads | k heads | v heads; a
plain tensor or an Int8Weight):

* qkv = x @ w_qkv^T (+ b_qkv), fp32;
* q and k optionally RMS-normalized with q_norm / k_norm, eps norm_eps: each head over hd (Qwen3,
  Gemma 3; norm_plus_one scales by 1 + weight, Gemma's convention), or with norm_whole the whole q
  [nq * hd] and the whole k [nkv * hd] projection (OLMo-2);
* RoPE in transformers' rotate_half convention on the first rotary_dim dims of each head (all of them
  unless given; Phi-3's partial rotary): pairs (i, i + rotary_dim/2) turned by the angle table row
  positions[b] (cos, sin [S, rotary_dim/2]); the other dims pass through;
* roped k and v written into k_cache / v_cache [R, nkv, S, hd] at [rows[b], :, positions[b], :], in the
  cache's dtype; roped q returned [B, nq, hd] in x's dtype.

``qkv_rope_write_torch`` is the reference. The Triton path runs the projection with ``linear`` (cuBLAS for
plain weights, the int8 kernel for Int8Weight) into an fp32 qkv, then ``_rope_write_kernel``: one program
per (token, head) that normalizes, ropes and stores that head. A whole-projection norm spans heads, so
it runs before that, as the rmsnorm kernel over the q and k columns of qkv, in place.

Positions and rows are checked against S and R only for CPU tensors (on a GPU that would cost a sync, and
the decode step is captured in a CUDA graph); on a GPU an out-of-range position is not written.
"""
from __future__ import annotations

import torch

from ._triton import (ACTIVATION_DTYPES, check_dtype, check_kv_caches, check_same_device, check_shape, choose_backend,
                      require_triton, tl, triton)
from .linear import Int8Weight, linear
from .rmsnorm import rmsnorm_triton


def _check(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads, head_dim,
           q_norm, k_norm, norm_whole, rotary_dim):
    name = "qkv_rope_write"
    check_dtype(name, "x", x)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{name}: head_dim must be even and positive, got {head_dim}")
    if not isinstance(rotary_dim, int) or not 2 <= rotary_dim <= head_dim or rotary_dim % 2:
        raise ValueError(f"{name}: rotary_dim must be even and in [2, head_dim = {head_dim}], got {rotary_dim!r}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"{name}: n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: x must be a non-empty [B, d] tensor, got shape {list(x.shape)}")
    B, d = x.shape
    n_out = (n_heads + 2 * n_kv_heads) * head_dim
    if isinstance(w_qkv, Int8Weight):
        w_shape = w_qkv.shape
    elif isinstance(w_qkv, torch.Tensor):
        check_dtype(name, "w_qkv", w_qkv)
        w_shape = tuple(w_qkv.shape)
    else:
        raise TypeError(f"{name}: w_qkv must be a tensor or an Int8Weight, got {type(w_qkv).__name__}")
    if w_shape != (n_out, d):
        raise ValueError(f"{name}: w_qkv must be [(n_heads + 2 n_kv_heads) * head_dim, d] = [{n_out}, {d}], "
                         f"got {list(w_shape)}")
    if b_qkv is not None:
        check_dtype(name, "b_qkv", b_qkv)
        check_shape(name, "b_qkv", b_qkv, (n_out,))
    R, _, S, _ = check_kv_caches(name, k_cache, v_cache, n_kv_heads=n_kv_heads, head_dim=head_dim)
    for what, t in (("cos", cos), ("sin", sin)):
        check_dtype(name, what, t, (torch.float32, torch.bfloat16, torch.float16))
        if t.dim() != 2 or t.shape[1] != rotary_dim // 2 or t.shape[0] < S:
            raise ValueError(f"{name}: {what} must be [>= S = {S}, rotary_dim / 2 = {rotary_dim // 2}], "
                             f"got {list(t.shape)}")
    for what, t in (("positions", positions), ("rows", rows)):
        check_dtype(name, what, t, (torch.int64,))
        check_shape(name, what, t, (B,))
    for what, t, heads in (("q_norm", q_norm, n_heads), ("k_norm", k_norm, n_kv_heads)):
        if t is not None:
            check_dtype(name, what, t)
            check_shape(name, what, t, (heads * head_dim if norm_whole else head_dim,))
    device = check_same_device(name, x=x, q=w_qkv.q if isinstance(w_qkv, Int8Weight) else w_qkv, b=b_qkv,
                               cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache,
                               rows=rows, q_norm=q_norm, k_norm=k_norm)
    if device.type == "cpu":
        if positions.min().item() < 0 or positions.max().item() >= S:
            raise ValueError(f"{name}: positions must be in [0, S = {S}), got {positions.tolist()}")
        if rows.min().item() < 0 or rows.max().item() >= R:
            raise ValueError(f"{name}: rows must be in [0, R = {R}), got {rows.tolist()}")
    return device


def _rmsnorm_last(t, weight, eps, plus_one):
    w = weight.float() + 1.0 if plus_one else weight.float()
    return t * torch.rsqrt(t.square().mean(dim=-1, keepdim=True) + eps) * w


def _norm(t, weight, eps, plus_one, whole):
    """t [B, heads, hd] fp32 normed per head, or (whole) over all heads * hd at once."""
    if whole:
        return _rmsnorm_last(t.reshape(t.shape[0], -1), weight, eps, plus_one).reshape(t.shape)
    return _rmsnorm_last(t, weight, eps, plus_one)


def _rope(t, cos, sin):
    """t [B, heads, hd] fp32, cos/sin [B, r/2] fp32: pairs (i, i + r/2) of the first r dims rotated
    (rotate_half); dims r.. pass through."""
    half = cos.shape[-1]
    t1, t2, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s, rest], dim=-1)


def qkv_rope_write_torch(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads,
                         head_dim, *, q_norm=None, k_norm=None, norm_eps: float = 1e-6,
                         norm_plus_one: bool = False, norm_whole: bool = False,
                         rotary_dim: int | None = None) -> torch.Tensor:
    """Reference: fp32 math throughout; writes the caches in place and returns roped q [B, nq, hd]."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    _check(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads, head_dim,
           q_norm, k_norm, norm_whole, rotary_dim)
    B = x.shape[0]
    w = w_qkv.dequantize() if isinstance(w_qkv, Int8Weight) else w_qkv.float()
    qkv = x.float() @ w.T
    if b_qkv is not None:
        qkv = qkv + b_qkv.float()
    nq, nkv, hd = n_heads, n_kv_heads, head_dim
    q = qkv[:, : nq * hd].reshape(B, nq, hd)
    k = qkv[:, nq * hd: (nq + nkv) * hd].reshape(B, nkv, hd)
    v = qkv[:, (nq + nkv) * hd:].reshape(B, nkv, hd)
    if q_norm is not None:
        q = _norm(q, q_norm, norm_eps, norm_plus_one, norm_whole)
    if k_norm is not None:
        k = _norm(k, k_norm, norm_eps, norm_plus_one, norm_whole)
    c, s = cos[positions].float(), sin[positions].float()
    q, k = _rope(q, c, s), _rope(k, c, s)
    k_cache[rows, :, positions, :] = k.to(k_cache.dtype)
    v_cache[rows, :, positions, :] = v.to(v_cache.dtype)
    return q.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, rows_ptr, norm_ptr, out_ptr, v_out_ptr,
                           stride_qkv, stride_cos, stride_sin, head0, n_out_heads, v_offset, S, eps,
                           HALF: tl.constexpr, HALF_PAD: tl.constexpr, HD: tl.constexpr, REST_PAD: tl.constexpr,
                           NORM: tl.constexpr, PLUS_ONE: tl.constexpr, IS_Q: tl.constexpr):
        """One program per (token b, head h): norm (optional) and rope head head0 + h of qkv[b].

        A head is HD values: t1 = [0, HALF) and t2 = [HALF, 2 HALF) are rotated as pairs, the rest
        [2 HALF, HD) (Phi-3's partial rotary; none when 2 HALF = HD) is normed and passed through.
        IS_Q: store into out [B, n_out_heads, HD]. Otherwise h is a kv head: store roped k into
        out = k_cache[rows[b], h, positions[b]] and copy v (v_offset values further on in qkv) to v_cache.
        """
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        i = tl.arange(0, HALF_PAD)
        ok = i < HALF
        src = qkv_ptr + b * stride_qkv + (head0 + h) * HD
        t1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
        t2 = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
        j = tl.arange(0, REST_PAD)
        rest_ok = j < HD - 2 * HALF  # all false without a pass-through part: its loads and stores vanish
        t3 = tl.load(src + 2 * HALF + j, mask=rest_ok, other=0.0).to(tl.float32)
        if NORM:
            ss = tl.sum(t1 * t1, axis=0) + tl.sum(t2 * t2, axis=0) + tl.sum(t3 * t3, axis=0)
            inv_rms = 1.0 / tl.sqrt(ss / HD + eps)
            w1 = tl.load(norm_ptr + i, mask=ok, other=0.0).to(tl.float32)
            w2 = tl.load(norm_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
            w3 = tl.load(norm_ptr + 2 * HALF + j, mask=rest_ok, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w1 = w1 + 1.0
                w2 = w2 + 1.0
                w3 = w3 + 1.0
            t1 = t1 * inv_rms * w1
            t2 = t2 * inv_rms * w2
            t3 = t3 * inv_rms * w3
        c = tl.load(cos_ptr + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_sin + i, mask=ok, other=0.0).to(tl.float32)
        r1 = t1 * c - t2 * s
        r2 = t2 * c + t1 * s
        if IS_Q:
            dst = out_ptr + (b * n_out_heads + h) * HD
            tl.store(dst + i, r1.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(dst + HALF + i, r2.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(dst + 2 * HALF + j, t3.to(out_ptr.dtype.element_ty), mask=rest_ok)
        else:
            row = tl.load(rows_ptr + b)
            pos_i = i * 0 + pos  # as a vector: the interpreter cannot mask with scalar booleans
            in_range = ok & (pos_i >= 0) & (pos_i < S)  # on a GPU a bad position is dropped, not written astray
            pos_j = j * 0 + pos
            rest_in = rest_ok & (pos_j >= 0) & (pos_j < S)
            off = ((row * n_out_heads + h) * S + pos) * HD
            tl.store(out_ptr + off + i, r1.to(out_ptr.dtype.element_ty), mask=in_range)
            tl.store(out_ptr + off + HALF + i, r2.to(out_ptr.dtype.element_ty), mask=in_range)
            tl.store(out_ptr + off + 2 * HALF + j, t3.to(out_ptr.dtype.element_ty), mask=rest_in)
            v1 = tl.load(src + v_offset + i, mask=ok, other=0.0)
            v2 = tl.load(src + v_offset + HALF + i, mask=ok, other=0.0)
            v3 = tl.load(src + v_offset + 2 * HALF + j, mask=rest_ok, other=0.0)
            tl.store(v_out_ptr + off + i, v1.to(v_out_ptr.dtype.element_ty), mask=in_range)
            tl.store(v_out_ptr + off + HALF + i, v2.to(v_out_ptr.dtype.element_ty), mask=in_range)
            tl.store(v_out_ptr + off + 2 * HALF + j, v3.to(v_out_ptr.dtype.element_ty), mask=rest_in)


def launch_config(head_dim: int, rotary_dim: int | None = None) -> dict:
    """HALF (rotated pairs), its padded width, the pass-through part's padded width, warps."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    return {"HALF": rotary_dim // 2, "HALF_PAD": triton.next_power_of_2(rotary_dim // 2),
            "REST_PAD": triton.next_power_of_2(max(1, head_dim - rotary_dim)),
            "num_warps": 1 if triton.next_power_of_2(head_dim // 2) <= 64 else 2}


def qkv_rope_write_triton(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads,
                          head_dim, *, q_norm=None, k_norm=None, norm_eps: float = 1e-6,
                          norm_plus_one: bool = False, norm_whole: bool = False,
                          rotary_dim: int | None = None) -> torch.Tensor:
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    device = _check(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads,
                    head_dim, q_norm, k_norm, norm_whole, rotary_dim)
    require_triton(device)
    B = x.shape[0]
    nq, nkv, hd = n_heads, n_kv_heads, head_dim
    if isinstance(w_qkv, Int8Weight):
        qkv = linear(x, w_qkv, out_dtype=torch.float32, backend="triton")
    else:
        qkv = linear(x, w_qkv) if w_qkv.dtype == x.dtype else x.float() @ w_qkv.float().T
    if b_qkv is not None:
        qkv = qkv.float() + b_qkv.float()  # fp32 from here on (the kernel casts after its loads anyway)
    qkv = qkv.contiguous()
    if norm_whole:  # OLMo-2: each norm spans every head of its projection; in place, before the per-head pass
        for norm, lo, hi in ((q_norm, 0, nq * hd), (k_norm, nq * hd, (nq + nkv) * hd)):
            if norm is not None:
                rmsnorm_triton(qkv[:, lo:hi], norm, norm_eps, plus_one=norm_plus_one, out=qkv[:, lo:hi])
        q_norm = k_norm = None
    cos, sin = (t if t.stride(1) == 1 else t.contiguous() for t in (cos, sin))
    q_norm = q_norm.contiguous() if q_norm is not None else None
    k_norm = k_norm.contiguous() if k_norm is not None else None
    q = torch.empty((B, nq, hd), dtype=x.dtype, device=device)
    S = k_cache.shape[2]
    cfg = launch_config(hd, rotary_dim)
    common = dict(HALF=cfg["HALF"], HALF_PAD=cfg["HALF_PAD"], HD=hd, REST_PAD=cfg["REST_PAD"],
                  PLUS_ONE=bool(norm_plus_one), num_warps=cfg["num_warps"])
    dummy = qkv  # never read when NORM is off
    _rope_write_kernel[(B, nq)](qkv, cos, sin, positions, rows, q_norm if q_norm is not None else dummy, q, q,
                                qkv.stride(0), cos.stride(0), sin.stride(0), 0, nq, 0, S, float(norm_eps),
                                NORM=q_norm is not None, IS_Q=True, **common)
    _rope_write_kernel[(B, nkv)](qkv, cos, sin, positions, rows, k_norm if k_norm is not None else dummy,
                                 k_cache, v_cache, qkv.stride(0), cos.stride(0), sin.stride(0), nq, nkv,
                                 nkv * hd, S, float(norm_eps), NORM=k_norm is not None, IS_Q=False, **common)
    return q


def qkv_rope_write(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads, head_dim,
                   *, q_norm=None, k_norm=None, norm_eps: float = 1e-6, norm_plus_one: bool = False,
                   norm_whole: bool = False, rotary_dim: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Project x [B, d] to q|k|v, norm (optional) and rope q and k, write k and v into the caches; return q.

    norm_plus_one: the q/k norms scale by (1 + weight) (Gemma's convention) instead of weight.
    norm_whole: q_norm [nq * hd] and k_norm [nkv * hd] norm the whole projections (OLMo-2), not each head.
    rotary_dim: RoPE turns the first rotary_dim dims of each head (None: all; Phi-3's partial rotary).
    """
    fn = qkv_rope_write_triton if choose_backend("qkv_rope_write", backend, x.device) == "triton" \
        else qkv_rope_write_torch
    return fn(x, w_qkv, b_qkv, cos, sin, positions, k_cache, v_cache, rows, n_heads, n_kv_heads, head_dim,
              q_norm=q_norm, k_norm=k_norm, norm_eps=norm_eps, norm_plus_one=norm_plus_one, norm_whole=norm_whole,
              rotary_dim=rotary_dim)
