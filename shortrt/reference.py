"""A short torch reference of the runtime's model: the test oracle for shortrt's C++ engine.

It runs a checkpoint directory the way the runtime does, including what
transformers cannot load: a shortrt.json plan with attention-less or MLP-less
layers, and a dense checkpoint with layers skipped. Everything is float32 and
computed over the whole sequence at once (no KV cache), gpt-fast style.

    ref = ReferenceModel.load("out/smollm2-p8")
    logits = ref(torch.tensor([[1, 2, 3]]))   # [batch, tokens, vocab]
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class RefConfig:
    architecture: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope: dict  # rope_parameters / rope_scaling, or {}
    tie_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_json(cls, c: dict) -> "RefConfig":
        arch = (c.get("architectures") or [MODEL_TYPES.get(c.get("model_type"), str(c.get("model_type")))])[0]
        if arch not in SUPPORTED:
            raise CheckpointError(f"unsupported architecture {arch!r}")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        heads = c["num_attention_heads"]
        return cls(
            architecture=arch, hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            n_layers=c["num_hidden_layers"], n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
            rms_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope=rope,
            tie_embeddings=c.get("tie_word_embeddings", False), qkv_bias=arch == "Qwen2ForCausalLM",
        )


def rope_inv_freq(cfg: RefConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, with transformers' linear and llama3 rescaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = cfg.rope.get("rope_type", cfg.rope.get("type", "default"))
    if kind == "linear":
        inv = inv / cfg.rope["factor"]
    elif kind == "llama3":
        factor, lo, hi = cfg.rope["factor"], cfg.rope["low_freq_factor"], cfg.rope["high_freq_factor"]
        old = cfg.rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise CheckpointError(f"unsupported rope type {kind!r}")
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: RefConfig, w: dict, prefix: str):
        super().__init__()
        self.cfg = cfg
        # q|k|v fused into one weight, as the runtime does.
        self.wqkv = torch.cat([w[prefix + f"{n}_proj.weight"] for n in "qkv"])
        self.bqkv = torch.cat([w[prefix + f"{n}_proj.bias"] for n in "qkv"]) if cfg.qkv_bias else None
        self.wo = w[prefix + "o_proj.weight"]

    def forward(self, x, cos, sin):
        cfg = self.cfg
        b, t, _ = x.shape
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv = F.linear(x, self.wqkv, self.bqkv)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = cfg.n_heads // cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(y.transpose(1, 2).reshape(b, t, q_size), self.wo)


class MLP(nn.Module):
    def __init__(self, w: dict, prefix: str):
        super().__init__()
        self.w_gate_up = torch.cat([w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]])
        self.w_down = w[prefix + "down_proj.weight"]

    def forward(self, x):
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down)


class Block(nn.Module):
    """One decoder layer; attention and/or MLP may be absent (shortrt.json flags)."""

    def __init__(self, cfg: RefConfig, w: dict, i: int, attention: bool, mlp: bool):
        super().__init__()
        p = f"model.layers.{i}."
        self.index = i
        self.attn_norm = RMSNorm(w[p + "input_layernorm.weight"], cfg.rms_eps) if attention else None
        self.attn = Attention(cfg, w, p + "self_attn.") if attention else None
        self.mlp_norm = RMSNorm(w[p + "post_attention_layernorm.weight"], cfg.rms_eps) if mlp else None
        self.mlp = MLP(w, p + "mlp.") if mlp else None

    def forward(self, h, cos, sin):
        if self.attn is not None:
            h = h + self.attn(self.attn_norm(h), cos, sin)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h


def read_plan(path: Path, n_layers: int, skip_layers=()) -> list[tuple[int, bool, bool]]:
    """(checkpoint layer, attention, mlp) for each executed layer, as the runtime plans it."""
    flags = [(True, True)] * n_layers
    meta_path = path / "shortrt.json"
    if meta_path.is_file():
        layers = json.loads(meta_path.read_text())["layers"]
        if len(layers) != n_layers:
            raise CheckpointError(f"shortrt.json lists {len(layers)} layers but config.json has {n_layers}")
        flags = [(e.get("attention", True), e.get("mlp", True)) for e in layers]
    skip = set(skip_layers)
    bad = [i for i in skip if not 0 <= i < n_layers]
    if bad:
        raise CheckpointError(f"skip_layers: layer {bad[0]} is out of range for a checkpoint of {n_layers} layers")
    return [(i, a, m) for i, (a, m) in enumerate(flags) if i not in skip]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return {k: v.float() for k, v in tensors.items()}


class ReferenceModel(nn.Module):
    def __init__(self, cfg: RefConfig, tensors: dict, plan: list[tuple[int, bool, bool]]):
        super().__init__()
        self.cfg = cfg
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = self.embed if cfg.tie_embeddings else tensors["lm_head.weight"]
        self.norm = RMSNorm(tensors["model.norm.weight"], cfg.rms_eps)
        self.blocks = nn.ModuleList(Block(cfg, tensors, i, a, m) for i, a, m in plan)
        self.inv_freq = rope_inv_freq(cfg)

    @classmethod
    def load(cls, path: "str | os.PathLike", skip_layers=()) -> "ReferenceModel":
        from .sources import load as load_source

        path = load_source(path).path
        cfg = RefConfig.from_json(json.loads((path / "config.json").read_text()))
        return cls(cfg, read_tensors(path), read_plan(path, cfg.n_layers, skip_layers))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, tokens] -> logits [batch, tokens, vocab] (float32)."""
        t = ids.shape[-1]
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        h = F.embedding(ids, self.embed)
        for block in self.blocks:
            h = block(h, cos, sin)
        return F.linear(self.norm(h), self.lm_head)

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (full forward per step; for short tests)."""
        seq = list(ids)
        for _ in range(max_new_tokens):
            seq.append(int(self(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(ids):]
