"""Fused per-token cosine similarity of two hidden-state tensors and the sums behind Block Influence.

Given x, y of shape [tokens, hidden] (fp32, bf16 or fp16), ``cosine_stats`` returns

* ``cos``  fp32 [tokens]: cos(x_t, y_t) = <x_t, y_t> / (|x_t| |y_t|), clamped to [-1, 1]
  (dot products and squared norms accumulate in fp32, the division happens in fp64);
* ``sums`` fp64 [2]:      (sum_t cos_t, sum_t arccos(cos_t) / pi).

Block Influence (ShortGPT) is ``1 - sums[0] / tokens`` and the angular distance (Gromov et al.)
is ``sums[1] / tokens``; summing across batches keeps calibration streaming.

A zero row (in x or y; in practice |x|^2 |y|^2 == 0 in fp64) gives cos = 0, an angular
distance of 0.5, instead of NaN. Both backends use the same definition.

Two implementations of the same math live side by side:

* ``_cosine_stats_kernel`` (Triton): each program reads a BLOCK_T x hidden band of x and y once,
  in BLOCK_H-wide 2-D tiles, accumulating <x,y>, |x|^2 and |y|^2 in fp32, then writes the
  per-token cos and its two partial sums. The launcher adds the per-program partials in fp64.
* ``cosine_stats_torch``: the reference and the CPU path.

On a machine without a GPU the Triton kernel runs only in Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is first imported: ``triton.jit`` decides
between compiled and interpreted functions when a function is defined, and triton's own jit'd
builtins are defined at its import.
"""
from __future__ import annotations

import math

import torch

from ._triton import BACKENDS, KernelUnavailableError, require_triton, tl, triton, triton_interpreted  # noqa: F401

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Few, large programs: the interpreter runs programs one after another at ~7 ms each. On a GPU
# a 64 x 128 tile over 8 warps is 32 values of each input per thread (never run on a GPU here).
BLOCK_TOKENS = 64
MAX_BLOCK_HIDDEN = 128
NUM_WARPS = 8


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _arccos_over_pi(c):
        """arccos(c) / pi for fp32 c in [-1, 1], elementwise.

        Triton has no arccos. Abramowitz & Stegun 4.4.46: arccos(a) = sqrt(1 - a) * P7(a) on
        [0, 1] with |error| <= 2e-8 (about 1e-7 in fp32), and arccos(-a) = pi - arccos(a).
        """
        a = tl.abs(c)
        p = -0.0012624911
        p = p * a + 0.0066700901
        p = p * a - 0.0170881256
        p = p * a + 0.0308918810
        p = p * a - 0.0501743046
        p = p * a + 0.0889789874
        p = p * a - 0.2145988016
        p = p * a + 1.5707963050
        r = tl.sqrt(tl.maximum(1.0 - a, 0.0)) * p
        r = tl.where(c < 0.0, 3.141592653589793 - r, r)
        return r * 0.3183098861837907  # 1 / pi

    @triton.jit
    def _cosine_stats_kernel(
        x_ptr, y_ptr,            # [n_tokens, hidden], rows strided, columns contiguous
        cos_ptr,                 # out fp32 [n_tokens]
        partial_ptr,             # out fp32 [n_programs, 2]: (sum cos, sum arccos/pi) of this band
        n_tokens, hidden, stride_x, stride_y,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_y

        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        xx = tl.zeros([BLOCK_T], dtype=tl.float32)
        yy = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = row_ok[:, None] & (cols < hidden)[None, :]
            # Cast before any arithmetic: the interpreter keeps bf16 as raw 16-bit patterns.
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(x * y, axis=1)
            xx += tl.sum(x * x, axis=1)
            yy += tl.sum(y * y, axis=1)

        # |x|^2 |y|^2 in fp64: cannot overflow, and sqrt(xx * xx) == xx exactly, so x == y gives
        # cos == 1 exactly (an fp32 product of two rounded norms is off by an ulp, and arccos
        # magnifies 6e-8 below 1 into an angle of 3e-4 rad). Per-token scalars only: cheap.
        norms_sq = xx.to(tl.float64) * yy.to(tl.float64)
        safe = tl.where(norms_sq > 0.0, norms_sq, 1.0)
        cos64 = tl.where(norms_sq > 0.0, dot.to(tl.float64) / tl.sqrt(safe), 0.0)
        cos = tl.minimum(tl.maximum(cos64.to(tl.float32), -1.0), 1.0)
        tl.store(cos_ptr + rows, cos, mask=row_ok)

        angular = _arccos_over_pi(cos)
        tl.store(partial_ptr + pid * 2, tl.sum(tl.where(row_ok, cos, 0.0), axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(tl.where(row_ok, angular, 0.0), axis=0))

    @triton.jit
    def _arccos_over_pi_kernel(c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """Elementwise arccos/pi, so tests can hold the polynomial to torch.arccos."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        c = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _arccos_over_pi(c), mask=ok)


# ----------------------------------------------------------------------------- launchers

def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"cosine_stats expects two torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"cosine_stats expects 2-D [tokens, hidden] tensors, got {x.dim()}-D and {y.dim()}-D")
    if x.shape != y.shape:
        raise ValueError(f"cosine_stats expects tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"cosine_stats got an empty tensor of shape {tuple(x.shape)}")
    for t in (x, y):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"cosine_stats supports float32, bfloat16 and float16, got {t.dtype}")
    if x.device != y.device:
        raise ValueError(f"cosine_stats expects both tensors on one device, got {x.device} and {y.device}")


def cosine_stats_torch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the per-token cos (fp32) and the fp64 sums (sum cos, sum arccos(cos)/pi)."""
    x32, y32 = x.float(), y.float()
    dot = (x32 * y32).sum(dim=1)
    norms_sq = x32.square().sum(dim=1).double() * y32.square().sum(dim=1).double()
    safe = torch.where(norms_sq > 0, norms_sq, 1.0)
    cos = torch.where(norms_sq > 0, dot.double() / safe.sqrt(), 0.0).float().clamp(-1.0, 1.0)
    cos64 = cos.double()
    sums = torch.stack([cos64.sum(), torch.arccos(cos64).sum() / math.pi])
    return cos, sums


def cosine_stats_triton(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernel: same outputs as cosine_stats_torch."""
    require_triton(x.device)
    # The kernel walks columns with unit stride; rows may be strided (views of [batch, seq, hidden]).
    x = x if x.stride(1) == 1 else x.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    n_tokens, hidden = x.shape
    n_programs = triton.cdiv(n_tokens, BLOCK_TOKENS)
    block_hidden = min(MAX_BLOCK_HIDDEN, triton.next_power_of_2(hidden))
    cos = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
    partial = torch.empty((n_programs, 2), dtype=torch.float32, device=x.device)
    _cosine_stats_kernel[(n_programs,)](
        x, y, cos, partial, n_tokens, hidden, x.stride(0), y.stride(0),
        BLOCK_T=BLOCK_TOKENS, BLOCK_H=block_hidden, num_warps=NUM_WARPS,
    )
    return cos, partial.double().sum(dim=0)


def arccos_over_pi_triton(c: torch.Tensor) -> torch.Tensor:
    """arccos(c)/pi by the kernel's polynomial (for testing it); c fp32 in [-1, 1]."""
    require_triton(c.device)
    c = c.contiguous().float()
    out = torch.empty_like(c)
    block = 1024
    _arccos_over_pi_kernel[(triton.cdiv(c.numel(), block),)](c, out, c.numel(), BLOCK=block)
    return out


def cosine_stats(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos(x_t, y_t) (fp32 [tokens]) and fp64 (sum cos, sum arccos(cos)/pi).

    backend: "triton" (the fused kernel), "torch" (the reference), or "auto": triton for tensors
    on a GPU when triton is installed, torch otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown cosine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_inputs(x, y)
    if backend == "auto":
        backend = "triton" if (x.device.type != "cpu" and triton is not None) else "torch"
    if backend == "triton":
        return cosine_stats_triton(x, y)
    return cosine_stats_torch(x, y)
