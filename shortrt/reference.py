"""A short torch reference of the runtime's model: the test oracle for shortrt's C++ engine.

It runs a checkpoint directory the way the runtime does, including what
transformers cannot load: a shortrt.json plan with attention-less or MLP-less
layers, and a dense checkpoint with layers skipped. Everything is float32 and
computed over the whole sequence at once (no KV cache), gpt-fast style.

    ref = ReferenceModel.load("out/smollm2-p8")
    logits = ref(torch.tensor([[1, 2, 3]]))   # [batch, tokens, vocab]
"""
from __future__ import annotations

import dataclasses

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import ModelConfig, Step, load
from .errors import ShortrtError

def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies over the rotated dims of a head (rotary_dim), with transformers'
    linear, llama3 and longrope rescaling. longrope (Phi-3) depends on the sequence length: its short
    factors up to cfg.rope_original_max_position tokens, its long ones beyond (its cos and sin are then
    scaled by cfg.rope_attention_factor, as ReferenceModel.forward does); seq_len is required for it, so a caller that
    knows only one table refuses such a model instead of running it with the wrong one."""
    dim = cfg.rotary_dim or cfg.head_dim
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if cfg.rope_type == "longrope":
        if seq_len is None:
            raise ShortrtError(f"{cfg.architecture}'s longrope RoPE switches frequencies with the sequence length "
                               "(short_factor up to original_max_position_embeddings = "
                               f"{cfg.rope_original_max_position} tokens, long_factor beyond); this engine does not "
                               "implement it")
        ext = cfg.rope_long_factor if seq_len > cfg.rope_original_max_position else cfg.rope_short_factor
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * cfg.rope_theta ** shape)
    inv = 1.0 / (cfg.rope_theta ** shape)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head of x [..., head_dim]; the rest pass through (Phi-3)."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, unit_offset: bool = False):
        super().__init__()
        # Gemma 3 scales by (1 + w), the sum taken in float32.
        self.weight, self.eps = (1.0 + weight.float()) if unit_offset else weight, eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, prefix: str):
        super().__init__()
        self.cfg = cfg
        # q|k|v fused into one weight, as the runtime does (Phi-3's checkpoint stores it so).
        if cfg.fused_projections:
            self.wqkv = w[prefix + "qkv_proj.weight"]
        else:
            self.wqkv = torch.cat([w[prefix + f"{n}_proj.weight"] for n in "qkv"])
        self.bqkv = torch.cat([w[prefix + f"{n}_proj.bias"] for n in "qkv"]) if cfg.qkv_bias else None
        self.wo = w[prefix + "o_proj.weight"]
        # Qwen3: each q and k head RMS-normed (over head_dim) before RoPE; OLMo-2: all of q, all of k.
        self.q_norm = RMSNorm(w[prefix + "q_norm.weight"], cfg.rms_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w[prefix + "k_norm.weight"], cfg.rms_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.window = 0  # Gemma 3's sliding_attention layers: Block sets cfg.sliding_window

    def forward(self, x, cos, sin):
        cfg = self.cfg
        b, t, _ = x.shape
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv = F.linear(x, self.wqkv, self.bqkv)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if self.q_norm is not None and cfg.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.q_norm is not None and not cfg.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        group = cfg.n_heads // cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scale = cfg.attn_scale or None  # Gemma 3: query_pre_attn_scalar ** -0.5
        if self.window:  # key j visible from query i when i - window < j <= i
            i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - self.window), scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.linear(y.transpose(1, 2).reshape(b, t, q_size), self.wo)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, prefix: str):
        super().__init__()
        if cfg.fused_projections:  # Phi-3: gate rows then up rows in one tensor
            self.w_gate_up = w[prefix + "gate_up_proj.weight"]
        else:
            self.w_gate_up = torch.cat([w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]])
        self.w_down = w[prefix + "down_proj.weight"]
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if cfg.gelu_tanh else F.silu  # Gemma 3: GeGLU

    def forward(self, x):
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.w_down)


class Block(nn.Module):
    """One decoder layer; attention and/or MLP may be absent (shortrt.json flags). Each sublayer's
    norm is applied to its input, or (OLMo-2, cfg.post_norm) to its output before the residual add."""

    def __init__(self, cfg: ModelConfig, w: dict, i: int, attention: bool, mlp: bool):
        super().__init__()
        p = f"model.layers.{i}."
        self.index, self.post_norm, self.sandwich = i, cfg.post_norm, cfg.sandwich_norm
        self.sliding = cfg.is_sliding(i)
        attn_norm, mlp_norm = (("post_attention_layernorm", "post_feedforward_layernorm") if cfg.post_norm
                               else ("input_layernorm", "pre_feedforward_layernorm") if cfg.sandwich_norm
                               else ("input_layernorm", "post_attention_layernorm"))
        norm = lambda name: RMSNorm(w[p + name + ".weight"], cfg.rms_eps, cfg.norm_unit_offset)  # noqa: E731
        self.attn_norm = norm(attn_norm) if attention else None
        self.attn = Attention(cfg, w, p + "self_attn.") if attention else None
        if attention and self.sliding:
            self.attn.window = cfg.sliding_window
        self.mlp_norm = norm(mlp_norm) if mlp else None
        self.mlp = MLP(cfg, w, p + "mlp.") if mlp else None
        # Gemma 3's norms of each sublayer's output, before the residual add.
        self.attn_post = norm("post_attention_layernorm") if attention and cfg.sandwich_norm else None
        self.mlp_post = norm("post_feedforward_layernorm") if mlp and cfg.sandwich_norm else None

    def forward(self, h, cos, sin):
        if self.sandwich:
            if self.attn is not None:
                h = h + self.attn_post(self.attn(self.attn_norm(h), cos, sin))
            if self.mlp is not None:
                h = h + self.mlp_post(self.mlp(self.mlp_norm(h)))
            return h
        if self.attn is not None:
            if self.post_norm:
                h = h + self.attn_norm(self.attn(h, cos, sin))
            else:
                h = h + self.attn(self.attn_norm(h), cos, sin)
        if self.mlp is not None:
            h = h + (self.mlp_norm(self.mlp(h)) if self.post_norm else self.mlp(self.mlp_norm(h)))
        return h


class ReferenceModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tensors: dict, plan: tuple[Step, ...]):
        super().__init__()
        self.cfg = cfg
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = self.embed if cfg.tie_embeddings else tensors["lm_head.weight"]
        self.norm = RMSNorm(tensors["model.norm.weight"], cfg.rms_eps, cfg.norm_unit_offset)
        self.blocks = nn.ModuleList(Block(cfg, tensors, s.index, s.attention, s.mlp) for s in plan)
        # longrope (Phi-3): the frequencies of short sequences; forward picks by its length.
        self.inv_freq = rope_inv_freq(cfg, seq_len=1)
        # Gemma 3's sliding_attention layers rotate with their own (plain) base.
        self.local_inv_freq = (rope_inv_freq(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                                                 rope_type="default"))
                               if cfg.rope_local_theta else self.inv_freq)

    @classmethod
    def load(cls, path: "str | os.PathLike", skip_layers=()) -> "ReferenceModel":
        m = load(path)
        return cls(m.model_config, m.read_tensors(), m.plan(skip_layers))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, tokens] -> logits [batch, tokens, vocab] (float32)."""
        t = ids.shape[-1]

        def table(inv, scale=1.0):
            freqs = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos() * scale, emb.sin() * scale

        # longrope: one frequency set for the whole forward, by its length, as transformers picks it.
        inv = rope_inv_freq(self.cfg, seq_len=t) if self.cfg.rope_type == "longrope" else self.inv_freq
        full, local = table(inv, self.cfg.rope_attention_factor), table(self.local_inv_freq)
        h = F.embedding(ids, self.embed)
        if self.cfg.embed_scale != 1.0:  # Gemma 3: times sqrt(hidden), a float32 scalar
            h = h * torch.tensor(self.cfg.embed_scale, dtype=torch.float32)
        for block in self.blocks:
            h = block(h, *(local if block.sliding else full))
        logits = F.linear(self.norm(h), self.lm_head)
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (full forward per step; for short tests)."""
        seq = list(ids)
        for _ in range(max_new_tokens):
            seq.append(int(self(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(ids):]
