"""SwiGLU of a fused gate|up projection: silu(gate_up[:, :ff]) * gate_up[:, ff:], fp32 math.

``swiglu_torch`` is the reference; ``_swiglu_kernel`` (Triton) is elementwise, one program per
(row, BLOCK-wide column tile).
"""
from __future__ import annotations

import torch

from ._triton import check_dtype, choose_backend, require_triton, tl, triton

ACTS = ("silu",)
MAX_BLOCK = 1024


def _check(gate_up, act):
    check_dtype("swiglu", "gate_up", gate_up)
    if act not in ACTS:
        raise ValueError(f"swiglu: unknown act {act!r}; choose one of {', '.join(ACTS)}")
    if gate_up.dim() != 2 or gate_up.shape[0] == 0 or gate_up.shape[1] == 0 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: gate_up must be a non-empty [n, 2 * ff] tensor, got shape {list(gate_up.shape)}")


def swiglu_torch(gate_up: torch.Tensor, *, act: str = "silu") -> torch.Tensor:
    """Reference: fp32 math, result in gate_up's dtype."""
    _check(gate_up, act)
    ff = gate_up.shape[1] // 2
    g, u = gate_up[:, :ff].float(), gate_up[:, ff:].float()
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)


if triton is not None:

    @triton.jit
    def _swiglu_kernel(gu_ptr, y_ptr, ff, stride_gu, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < ff
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + ff + cols, mask=ok, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def launch_config(ff: int) -> dict:
    return {"BLOCK": min(MAX_BLOCK, triton.next_power_of_2(ff)), "num_warps": 4}


def swiglu_triton(gate_up: torch.Tensor, *, act: str = "silu") -> torch.Tensor:
    _check(gate_up, act)
    require_triton(gate_up.device)
    gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
    n, ff = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((n, ff), dtype=gate_up.dtype, device=gate_up.device)
    cfg = launch_config(ff)
    _swiglu_kernel[(n, triton.cdiv(ff, cfg["BLOCK"]))](gate_up, y, ff, gate_up.stride(0), y.stride(0),
                                                      BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return y


def swiglu(gate_up: torch.Tensor, *, act: str = "silu", backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up of gate_up [n, 2 ff] (fp32 or bf16) -> [n, ff] in the same dtype."""
    if choose_backend("swiglu", backend, gate_up.device) == "triton":
        return swiglu_triton(gate_up, act=act)
    return swiglu_torch(gate_up, act=act)
