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


def sample_triton(logits, temperature, top_k, top_p, uniform) -> torch.Tensor:
    device = _check(logits, temperature, top_k, top_p, uniform)
    require_triton(device)
    return sample_torch(logits, temperature, top_k, top_p, uniform)  # next step: the kernel


def sample(logits, temperature, top_k, top_p, uniform, *, backend: str = "auto") -> torch.Tensor:
    """One token per row of logits [B, V] fp32 for the given per-row parameters and uniforms in [0, 1)."""
    if choose_backend("sample", backend, logits.device) == "triton":
        return sample_triton(logits, temperature, top_k, top_p, uniform)
    return sample_torch(logits, temperature, top_k, top_p, uniform)
