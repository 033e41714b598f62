"""Weight-only int8 linear layers: the packing (bit-identical to the C++ runtime's BlockQ8) and y = x W^T.

An ``Int8Weight`` holds q int8 [m, k] and scale fp32 [m, k // 32]: weight[r, c] = scale[r, c // 32] * q[r, c].
``quantize_int8`` follows csrc/kernels_ref.cpp ``quantize_row_q8_ref`` operation for operation: per block
of 32 along k, amax = max |w|, scale = amax / 127 (fp32 division), inv = 1 / scale (0 for an all-zero
block), q = round-half-even(w * inv) clamped to [-127, 127]. It multiplies by the fp32 reciprocal, not
divides by the scale: the two differ in the last bit for some inputs, and the C++ runtime multiplies.

``linear_int8_torch`` is the reference (dequantize to fp32, fp32 matmul); ``_linear_int8_kernel``
(Triton) never materializes the fp32 weight: each program loads int8 tiles of BLOCK_M rows and
dequantizes them in registers, 32 columns (one block, one scale a row) at a time, accumulating in fp32.
``linear`` is the engine's one call: torch.matmul for plain weights, linear_int8 for Int8Weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import check_dtype, check_same_device, choose_backend, require_triton, tl, triton

Q8_BLOCK = 32


@dataclass(frozen=True)
class Int8Weight:
    """q int8 [m, k], scale fp32 [m, k // 32] (one scale per 32 consecutive weights of a row)."""

    q: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise TypeError("Int8Weight: q must be an int8 [m, k] tensor")
        m, k = self.q.shape
        if k % Q8_BLOCK:
            raise ValueError(f"Int8Weight: k = {k} is not a multiple of {Q8_BLOCK}")
        if (not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float32
                or tuple(self.scale.shape) != (m, k // Q8_BLOCK)):
            raise TypeError(f"Int8Weight: scale must be fp32 [{m}, {k // Q8_BLOCK}], got "
                            f"{getattr(self.scale, 'dtype', type(self.scale).__name__)} {list(getattr(self.scale, 'shape', []))}")
        if self.q.device != self.scale.device:
            raise ValueError(f"Int8Weight: q on {self.q.device} and scale on {self.scale.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device) -> "Int8Weight":
        return Int8Weight(self.q.to(device), self.scale.to(device))

    def dequantize(self) -> torch.Tensor:
        """The fp32 [m, k] weight the blocks stand for (scale * q, one fp32 product each, as the C++ runtime)."""
        return self.q.float() * self.scale.repeat_interleave(Q8_BLOCK, dim=1)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Pack w [m, k] (any float dtype; k % 32 == 0) into BlockQ8 form, bit-identical to the C++ runtime."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"quantize_int8: w must be a floating [m, k] tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)} of {getattr(w, 'dim', lambda: '?')()} dims")
    m, k = w.shape
    if k % Q8_BLOCK:
        raise ValueError(f"quantize_int8: k = {k} is not a multiple of {Q8_BLOCK} (the int8 block width)")
    blocks = w.float().reshape(m, k // Q8_BLOCK, Q8_BLOCK)
    if not torch.isfinite(blocks).all():
        raise ValueError("quantize_int8: the weight holds NaN or infinity")
    scale = blocks.abs().amax(dim=2) / 127.0
    inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    q = torch.round(blocks * inv[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.reshape(m, k).contiguous(), scale.contiguous())


def _check(x, w):
    if not isinstance(w, Int8Weight):
        raise TypeError(f"linear_int8: w must be an Int8Weight, got {type(w).__name__}")
    check_dtype("linear_int8", "x", x)
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear_int8: x must be [n, {w.shape[1]}] for a weight of shape {list(w.shape)}, "
                         f"got {list(x.shape)}")
    return check_same_device("linear_int8", x=x, q=w.q)


def linear_int8_torch(x: torch.Tensor, w: Int8Weight, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference: x [n, k] @ dequantized(w)^T in fp32, returned in x's dtype (or out_dtype)."""
    _check(x, w)
    return (x.float() @ w.dequantize().T).to(out_dtype or x.dtype)


if triton is not None:

    @triton.jit
    def _linear_int8_kernel(x_ptr, q_ptr, s_ptr, y_ptr, n, m, k, stride_x, stride_y,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_BF16: tl.constexpr):
        """y[n, m] = x[n, k] @ (scale * q)[m, k]^T; one program per (BLOCK_M weight rows, BLOCK_N tokens).

        Each 32-column block is one dot of exact operands (int8 levels are exact in bf16 and fp32)
        scaled by its per-row scale after the dot, so the products never round; fp32 accumulation.
        """
        rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rows_m < m
        n_ok = rows_n < n
        n_blocks = k // 32
        cols = tl.arange(0, 32)
        x_rows = x_ptr + rows_n.to(tl.int64)[:, None] * stride_x
        q_rows = q_ptr + rows_m.to(tl.int64)[None, :] * k
        s_rows = s_ptr + rows_m.to(tl.int64) * n_blocks
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            for j in tl.static_range(BLOCK_K // 32):
                kk = k0 + j * 32 + cols
                k_ok = kk < k
                x = tl.load(x_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                w = tl.load(q_rows + kk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0).to(tl.float32)
                scale = tl.load(s_rows + (k0 // 32 + j), mask=m_ok & (rows_m * 0 + k0 + j * 32 < k), other=0.0)
                if DOT_BF16:
                    part = tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16))
                else:
                    part = tl.dot(x, w, input_precision="ieee")
                acc += part * scale[None, :]
        y_ptrs = y_ptr + rows_n.to(tl.int64)[:, None] * stride_y + rows_m[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def launch_config(n: int, m: int, k: int, *, x_dtype=torch.bfloat16, interpreted: bool = False) -> dict:
    """Tiles for y[n, m] = x[n, k] W^T (the one place they are chosen).

    Decode is weight-bandwidth bound: 16 tokens a tile (tl.dot's smallest), BLOCK_M small enough that
    m / BLOCK_M programs fill the GPU, 128 columns (4 int8 blocks) a step. The interpreter runs
    programs one after another, so there the tiles are as large as the matrix allows.
    """
    if interpreted:
        return {"BLOCK_N": 16, "BLOCK_M": min(128, max(16, triton.next_power_of_2(m))), "BLOCK_K": 128,
                "DOT_BF16": False, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 16, "BLOCK_M": 32 if m <= 16384 else 64, "BLOCK_K": 128,
            "DOT_BF16": x_dtype == torch.bfloat16, "num_warps": 4, "num_stages": 3}


def linear_int8_triton(x: torch.Tensor, w: Int8Weight, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    device = _check(x, w)
    require_triton(device)
    x = x if x.stride(1) == 1 else x.contiguous()
    n, k = x.shape
    m = w.shape[0]
    y = torch.empty((n, m), dtype=out_dtype or x.dtype, device=device)
    cfg = launch_config(n, m, k, x_dtype=x.dtype, interpreted=device.type == "cpu")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _linear_int8_kernel[grid](x, w.q, w.scale, y, n, m, k, x.stride(0), y.stride(0), **cfg)
    return y


def linear_int8(x: torch.Tensor, w: Int8Weight, *, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """y = x W^T for x [n, k] (fp32 or bf16) and an int8 weight [m, k]: [n, m] in x's dtype (or out_dtype)."""
    if choose_backend("linear_int8", backend, x.device) == "triton":
        return linear_int8_triton(x, w, out_dtype=out_dtype)
    return linear_int8_torch(x, w, out_dtype=out_dtype)


def linear(x: torch.Tensor, w, *, out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """y = x W^T: torch.matmul for a plain [m, k] tensor (in x's dtype), linear_int8 for an Int8Weight."""
    if isinstance(w, Int8Weight):
        return linear_int8(x, w, out_dtype=out_dtype, backend=backend)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"linear: w must be a [m, k] tensor or an Int8Weight, got {type(w).__name__}")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x must be [n, {w.shape[1]}] for a weight of shape {list(w.shape)}, got {list(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"linear: x is {x.dtype} and w is {w.dtype}; a plain weight must match the activations")
    y = torch.matmul(x, w.T)
    return y if out_dtype is None else y.to(out_dtype)
