"""Token sampling from logits with given uniforms: greedy, temperature, top-k, top-p.

For row b with temperature T = temperature[b]:

* T < MIN_TEMPERATURE (1e-4, the C++ runtime's limit; 0 included): argmax, the lowest index on ties;
* otherwise e_i = exp((logits_i - max) / T); keep the tokens with e_i >= the top_k-th largest e (top_k 0
  or >= V: all; ties at the threshold are all kept); then, if top_p < 1, also keep only e_i >= t_p where
  t_p is the smallest kept value such that the kept tokens with e >= t_p hold at least top_p of the kept
  mass (the smallest set of largest probabilities reaching top_p, ties kept); the token is the first in
  token-index order where the running sum of kept e exceeds uniform[b] * (kept mass), or the last kept
  token if rounding leaves none.

``sample_torch`` is the reference (sorts). Triton has no sort: ``_sample_kernel`` (one program per row)
finds both thresholds by bisection on the bits of e (non-negative floats order like their int32 bit
patterns), a fixed 31 passes over the row each, so thresholds are exact values of e.
"""
from __future__ import annotations

import torch

from ._triton import check_dtype, check_same_device, check_shape, choose_backend, require_triton, tl, triton

MIN_TEMPERATURE = 1e-4


def _check(logits, temperature, top_k, top_p, uniform):
    name = "sample"
    check_dtype(name, "logits", logits, (torch.float32,))
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name}: logits must be a non-empty [B, V] tensor, got shape {list(logits.shape)}")
    B = logits.shape[0]
    for what, t, dt in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int64),
                        ("top_p", top_p, torch.float32), ("uniform", uniform, torch.float32)):
        check_dtype(name, what, t, (dt,))
        check_shape(name, what, t, (B,))
    device = check_same_device(name, logits=logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               uniform=uniform)
    if device.type == "cpu":
        if not (torch.isfinite(temperature).all() and (temperature >= 0).all()):
            raise ValueError(f"{name}: temperature must be finite and >= 0, got {temperature.tolist()}")
        if (top_k < 0).any():
            raise ValueError(f"{name}: top_k must be >= 0 (0 = all), got {top_k.tolist()}")
        if not ((top_p > 0) & (top_p <= 1)).all():
            raise ValueError(f"{name}: top_p must be in (0, 1], got {top_p.tolist()}")
        if not ((uniform >= 0) & (uniform < 1)).all():
            raise ValueError(f"{name}: uniform must be in [0, 1), got {uniform.tolist()}")
    return device


def sample_torch(logits, temperature, top_k, top_p, uniform) -> torch.Tensor:
    """Reference: [B] int64 tokens."""
    _check(logits, temperature, top_k, top_p, uniform)
    B, V = logits.shape
    greedy = temperature < MIN_TEMPERATURE
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    z = logits / t[:, None]
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    desc = e.sort(dim=1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
    keep = e >= desc.gather(1, (k - 1)[:, None])
    kept = torch.where(keep, e, 0.0)
    total = kept.sum(dim=1)
    desc_kept = kept.sort(dim=1, descending=True).values
    reach = desc_kept.cumsum(dim=1) >= (top_p * total)[:, None]
    n_p = (~reach).sum(dim=1).clamp(max=V - 1)  # index of the first prefix that reaches top_p
    t_p = desc_kept.gather(1, n_p[:, None])
    keep &= torch.where((top_p < 1.0)[:, None], e >= t_p, True)
    kept = torch.where(keep, e, 0.0)
    target = uniform * kept.sum(dim=1)
    token = (kept.cumsum(dim=1) <= target[:, None]).sum(dim=1)
    idx = torch.arange(V, device=logits.device)
    last_kept = torch.where(keep, idx, -1).max(dim=1).values
    token = torch.minimum(token, last_kept)
    return torch.where(greedy, logits.argmax(dim=1), token)


if triton is not None:

    @triton.jit
    def _exp_tile(row_ptr, v0, V, inv_t, z_max, BLOCK_V: tl.constexpr):
        """e = exp((logits - max) / T) of one tile (0 outside the row), its indices and validity."""
        idx = v0 + tl.arange(0, BLOCK_V)
        ok = idx < V
        x = tl.load(row_ptr + idx, mask=ok, other=0.0)
        e = tl.where(ok, tl.exp(x * inv_t - z_max), 0.0)
        return e, idx, ok

    @triton.jit
    def _mass_above(row_ptr, V, inv_t, z_max, threshold, BLOCK_V: tl.constexpr):
        """(count, sum) of the e whose bits are >= threshold (an int32 bit pattern of a float >= 0)."""
        count = 0
        total = 0.0
        for v0 in range(0, V, BLOCK_V):
            e, idx, ok = _exp_tile(row_ptr, v0, V, inv_t, z_max, BLOCK_V)
            kept = ok & (e.to(tl.int32, bitcast=True) >= threshold)
            count += tl.sum(kept.to(tl.int32), axis=0)
            total += tl.sum(tl.where(kept, e, 0.0), axis=0)
        return count, total

    @triton.jit
    def _sample_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, uniform_ptr, out_ptr, V, stride,
                       min_temperature, BLOCK_V: tl.constexpr):
        """One program per row; see the module docstring for the rule. Bisection keeps lo a threshold
        that holds (count >= k, or mass >= target) and hi one that does not, over the bit patterns of
        e in [0, 1]: 30 halvings take hi - lo from 2^30 to 1, leaving lo the exact kept value."""
        b = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + b * stride
        t = tl.load(temperature_ptr + b)
        # pass 1: the argmax (lowest index on ties) and the largest scaled logit
        best = -float("inf")
        best_idx = V * 0
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + idx, mask=idx < V, other=-float("inf"))
            tile_max = tl.max(x, axis=0)
            tile_idx = tl.min(tl.where(x == tile_max, idx, V), axis=0)
            better = tile_max > best
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_max, best)
        token = best_idx
        if t >= min_temperature:
            inv_t = 1.0 / t
            z_max = best * inv_t
            k = tl.load(top_k_ptr + b)
            top_p = tl.load(top_p_ptr + b)
            one_up = 0x3F800001  # just above the bits of 1.0, the largest e: nothing is kept
            lo = 0
            if (k > 0) & (k < V):
                hi = one_up
                for _ in range(30):
                    mid = lo + (hi - lo) // 2
                    count, _total = _mass_above(row_ptr, V, inv_t, z_max, mid, BLOCK_V)
                    lo = tl.where(count >= k, mid, lo)
                    hi = tl.where(count >= k, hi, mid)
            if top_p < 1.0:
                _count, kept_total = _mass_above(row_ptr, V, inv_t, z_max, lo, BLOCK_V)
                target = top_p * kept_total
                hi = one_up
                for _ in range(30):
                    mid = lo + (hi - lo) // 2
                    _count, mass = _mass_above(row_ptr, V, inv_t, z_max, mid, BLOCK_V)
                    lo = tl.where(mass >= target, mid, lo)
                    hi = tl.where(mass >= target, hi, mid)
            _count, kept_mass = _mass_above(row_ptr, V, inv_t, z_max, lo, BLOCK_V)
            draw = tl.load(uniform_ptr + b) * kept_mass
            # last pass: the first kept index where the running sum of kept e exceeds draw
            run = 0.0
            found = V * 0 - 1
            last = V * 0 - 1
            for v0 in range(0, V, BLOCK_V):
                e, idx, ok = _exp_tile(row_ptr, v0, V, inv_t, z_max, BLOCK_V)
                kept = ok & (e.to(tl.int32, bitcast=True) >= lo)
                ek = tl.where(kept, e, 0.0)
                running = run + tl.cumsum(ek, axis=0)
                first = tl.min(tl.where(kept & (running > draw), idx, V), axis=0)
                found = tl.where((found < 0) & (first < V), first, found)
                last = tl.maximum(last, tl.max(tl.where(kept, idx, -1), axis=0))
                run += tl.sum(ek, axis=0)
            token = tl.where(found >= 0, found, last)
        tl.store(out_ptr + b, token.to(tl.int64))


def launch_config(V: int) -> dict:
    return {"BLOCK_V": min(2048, triton.next_power_of_2(V)), "num_warps": 8 if V >= 8192 else 4}


def sample_triton(logits, temperature, top_k, top_p, uniform) -> torch.Tensor:
    device = _check(logits, temperature, top_k, top_p, uniform)
    require_triton(device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=device)
    cfg = launch_config(V)
    _sample_kernel[(B,)](logits, temperature, top_k, top_p, uniform, out, V, logits.stride(0), MIN_TEMPERATURE,
                         BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])
    return out


def sample(logits, temperature, top_k, top_p, uniform, *, backend: str = "auto") -> torch.Tensor:
    """One token per row of logits [B, V] fp32 for the given per-row parameters and uniforms in [0, 1)."""
    if choose_backend("sample", backend, logits.device) == "triton":
        return sample_triton(logits, temperature, top_k, top_p, uniform)
    return sample_torch(logits, temperature, top_k, top_p, uniform)
