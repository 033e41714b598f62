"""The gated MLP activation of a fused gate|up projection: act(gate_up[:, :ff]) * gate_up[:, ff:], fp32 math.

act "silu" is SwiGLU (Llama and most families); "gelu_tanh" is Gemma 3's GeGLU with GELU's tanh
approximation, torch's gelu(approximate="tanh"): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
The kernel writes it as g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)), the same function (0.5 (1 + tanh z)
= sigmoid(2 z)) with one exp and no tanh (which Triton has only through libdevice).

``swiglu_torch`` is the reference; ``_swiglu_kernel`` (Triton) is elementwise, one program per
(row, BLOCK-wide column tile).
"""
from __future__ import annotations

import torch

from ._triton import check_dtype, choose_backend, require_triton, tl, triton

ACTS = ("silu", "gelu_tanh")
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
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (a * u).to(gate_up.dtype)


if triton is not None:

    @triton.jit
    def _swiglu_kernel(gu_ptr, y_ptr, ff, stride_gu, stride_y, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < ff
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + ff + cols, mask=ok, other=0.0).to(tl.float32)
        if GELU_TANH:
            z = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2 sqrt(2/pi) (g + 0.044715 g^3)
            y = g / (1.0 + tl.exp(-z)) * u
        else:
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
                                                      GELU_TANH=act == "gelu_tanh", BLOCK=cfg["BLOCK"],
                                                      num_warps=cfg["num_warps"])
    return y


def swiglu(gate_up: torch.Tensor, *, act: str = "silu", backend: str = "auto") -> torch.Tensor:
    """act(gate) * up of gate_up [n, 2 ff] (fp32 or bf16) -> [n, ff] in the same dtype; act "silu" or
    "gelu_tanh" (Gemma 3's GeGLU)."""
    if choose_backend("swiglu", backend, gate_up.device) == "triton":
        return swiglu_triton(gate_up, act=act)
    return swiglu_torch(gate_up, act=act)
