"""Low-rank adapters (LoRA, Hu et al. 2021) beside frozen linear layers, merged back when done.

An adapter is two small matrices next to a frozen weight W [out, in]: A [rank, in] (small random)
and B [out, rank] (zero), and the layer computes W x + B (A x) * alpha / rank. B = 0 makes the
adapted model start exactly where the frozen one is. `merge` folds the adapter into the weight
once (W += B @ A * scale) and gives back the plain nn.Linear, so the trained model is again a
standard checkpoint of the same layout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# The projections of a decoder layer's two sublayers (transformers' Llama/Mistral/Qwen2/Qwen3/OLMo-2 names;
# Phi-3 fuses them: FUSED_*).
ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJECTIONS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_ATTENTION_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj")
FUSED_MLP_PROJECTIONS = ("mlp.gate_up_proj", "mlp.down_proj")


def projections_of(layer: nn.Module, parts) -> tuple[str, ...]:
    """The projections of `layer`'s sublayers named in parts ("attention", "mlp"), as the layer names them."""
    fused = hasattr(layer.mlp, "gate_up_proj")  # Phi-3
    out: tuple[str, ...] = ()
    for part in parts:
        if part == "attention":
            out += FUSED_ATTENTION_PROJECTIONS if fused else ATTENTION_PROJECTIONS
        else:
            out += FUSED_MLP_PROJECTIONS if fused else MLP_PROJECTIONS
    return out


class LoRALinear(nn.Module):
    """base(x) + (x A^T B^T) * scale, with base frozen. base keeps its bias (Qwen2's q/k/v)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        # A as nn.Linear's default init draws it (uniform, bound 1/sqrt(in)); B zero.
        bound = 1 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        # The adapter stays fp32 when the frozen base runs in bf16 (healing's fast path): its
        # updates are small next to its values, and bf16 would round them away.
        # Drawn on the CPU (the generator's device), so the init is the same whatever the device.
        device = base.weight.device
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T * self.scale
        return self.base(x) + low_rank.to(x.dtype)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """What merging adds to the weight: B @ A * scale, [out, in] fp32."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        module = getattr(module, name)
    return module, leaf


def attach(layer: nn.Module, projections, rank: int, alpha: float, generator: torch.Generator) -> list[LoRALinear]:
    """Wrap each named projection of `layer` (e.g. "self_attn.q_proj") in a LoRALinear."""
    adapters = []
    for path in projections:
        parent, leaf = _parent(layer, path)
        adapter = LoRALinear(getattr(parent, leaf), rank, alpha, generator)
        setattr(parent, leaf, adapter)
        adapters.append(adapter)
    return adapters


def deltas(layer: nn.Module) -> dict[str, torch.Tensor]:
    """{projection path: its adapter's delta} for every adapter in `layer`."""
    return {path: m.delta() for path, m in layer.named_modules() if isinstance(m, LoRALinear)}


def merge(layer: nn.Module) -> list[str]:
    """Merge every adapter in `layer` into its weight and put the plain nn.Linear back; returns
    the merged projections' paths."""
    merged = []
    for path, module in list(layer.named_modules()):
        if isinstance(module, LoRALinear):
            parent, leaf = _parent(layer, path)
            setattr(parent, leaf, module.merge())
            merged.append(path)
    return merged
