"""RMSNorm over the last axis: y = x * rsqrt(mean(x^2) + eps) * (weight, or 1 + weight), fp32 math.

``rmsnorm_torch`` is the reference; ``_rmsnorm_kernel`` (Triton) gives each row one program that walks
the row twice in BLOCK_D-wide tiles (sum of squares, then scale and store), so any hidden size works.
"""
from __future__ import annotations

import torch

from ._triton import check_dtype, check_same_device, check_shape, choose_backend, require_triton, tl, triton

MAX_BLOCK_D = 4096  # 4096 fp32 over 4 warps is 32 values a thread


def _check(x, weight, eps):
    check_dtype("rmsnorm", "x", x)
    check_dtype("rmsnorm", "weight", weight)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"rmsnorm: x must be a non-empty [n, d] tensor, got shape {list(x.shape)}")
    check_shape("rmsnorm", "weight", weight, (x.shape[1],))
    if not eps > 0:
        raise ValueError(f"rmsnorm: eps must be > 0, got {eps}")
    return check_same_device("rmsnorm", x=x, weight=weight)


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, *, plus_one: bool = False) -> torch.Tensor:
    """Reference: fp32 math, result in x's dtype."""
    _check(x, weight, eps)
    x32 = x.float()
    w = weight.float() + 1.0 if plus_one else weight.float()
    return (x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps) * w).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, d, stride_x, stride_y, eps,
                        PLUS_ONE: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_row + cols, mask=cols < d, other=0.0).to(tl.float32)
            sq += x * x
        inv_rms = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / d + eps)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = cols < d
            x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w = w + 1.0
            tl.store(y_ptr + row * stride_y + cols, (x * inv_rms * w).to(y_ptr.dtype.element_ty), mask=ok)


def launch_config(d: int) -> dict:
    """Block size and warps for rows of width d (the one place they are chosen)."""
    block = min(MAX_BLOCK_D, triton.next_power_of_2(d))
    return {"BLOCK_D": block, "num_warps": 4 if block <= 2048 else 8}


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, plus_one: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """out: where to write (x's shape and dtype, unit column stride; may be x itself: each row is read
    whole before its program writes it)."""
    device = _check(x, weight, eps)
    require_triton(device)
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    n, d = x.shape
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(1) != 1
                            or out.device != x.device):
        raise ValueError(f"rmsnorm: out must be a {list(x.shape)} {x.dtype} tensor with unit column stride")
    y = torch.empty((n, d), dtype=x.dtype, device=device) if out is None else out
    cfg = launch_config(d)
    _rmsnorm_kernel[(n,)](x, weight, y, d, x.stride(0), y.stride(0), float(eps),
                          PLUS_ONE=bool(plus_one), BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return y


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, plus_one: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """RMSNorm of each row of x [n, d] (fp32 or bf16) with weight [d]; returns x's dtype."""
    if choose_backend("rmsnorm", backend, x.device) == "triton":
        return rmsnorm_triton(x, weight, eps, plus_one=plus_one)
    return rmsnorm_torch(x, weight, eps, plus_one=plus_one)
