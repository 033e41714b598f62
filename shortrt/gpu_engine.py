"""shortrt.gpu_engine.GpuEngine: the C++ runtime's plan run by torch and the Triton kernels (shortrt/kernels).

    eng = shortrt.Engine("out/smollm2-p8", device="cuda", dtype="bf16")   # returns a GpuEngine
    print(eng.generate("Once upon a time", max_new_tokens=32))

The same plan as the C++ runtime (checkpoint.Model.plan: only the retained layers and sublayers), weights
on the device with q|k|v and gate|up fused at load, and a compact KV cache: one K and one V tensor
[max_batch, n_kv_heads, max_seq, head_dim] per retained attention, nothing for removed layers or
attention-less ones. A KV row is a sequence's region.

  prefill   one sequence's prompt chunk: torch matmuls and scaled_dot_product_attention, K/V written
            into its row of the cache;
  decode    one token of every running sequence at once through the kernels (rmsnorm, qkv_rope_write,
            decode_attention, linear / linear_int8, swiglu, sample); on CUDA the step for each batch
            size is captured once in a CUDA graph over static input buffers and replayed.

The request interface (submit / step / cancel / stats) follows shortrt.Engine's contract, so
shortrt.serving and the HTTP server drive either engine; generate_ids / generate / stream / logits /
stop tokens / argument errors are the CPU engine's (shortrt.engine's helpers, not copies).

device="cpu" runs the same code on CPU tensors (fp32, bf16 or int8): with TRITON_INTERPRET=1 the Triton
kernels run in Triton's interpreter, which is how the tests check this module without a GPU.

Sampling draws its uniforms from a per-request numpy PCG64 seeded with `seed`, so a sequence samples the
same tokens alone or in a batch; the tokens differ from the C++ runtime's (another generator and another
walk over the kept tokens), greedy decoding gives the same ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .engine import (_INT32_MAX, MIN_TEMPERATURE, Detokenizer, TextEngine, _check_sampling, _int_arg,
                     prompt_lists)
from .devices import resolve_device
from .errors import CheckpointError, DeviceUnavailableError
from .kernels._triton import BACKENDS, KernelUnavailableError, choose_backend
from .kernels.attention import decode_attention
from .kernels.linear import Int8Weight, linear, quantize_int8
from .kernels.qkv_rope import qkv_rope_write
from .kernels.rmsnorm import rmsnorm
from .kernels.sample import sample
from .kernels.swiglu import swiglu
from .reference import rope, rope_inv_freq

DTYPES = ("fp32", "bf16", "int8")  # int4 runs on the CPU runtime only
KV_DTYPES = ("fp32", "bf16")
LM_HEAD_DTYPES = ("auto", "same") + DTYPES
# The families whose decoder layer the GPU engine builds: pre-norm Llama layers (Qwen2's biases, Qwen3's
# per-head q/k norm), OLMo-2 (norms after the sublayers, q/k norm over the whole projection), Phi-3 (fused
# qkv / gate_up tensors, partial rotary) and Gemma 3 text (sandwich (1 + w) norms, GeGLU, sliding-window
# layers with their own RoPE base, the embedding scale, the final softcap). Others are refused before any
# weight is read.
GPU_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                               "Olmo2ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"})
GPU_ROPE_TYPES = ("default", "linear", "llama3")  # one angle table per position (not Phi-3's longrope)
DEFAULT_MAX_SEQ = 2048
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill pass (and per step beside the decoding rows)
INT8_PREFILL_DEQUANT_ROWS = 16  # above this many rows an int8 prefill matmul dequantizes the weight first
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class _Layer:
    """One executed layer's weights on the device (None where the sublayer was removed)."""
    index: int  # checkpoint layer
    slot: int = -1  # KV-cache slot of its attention (-1: none)
    window: int = 0  # keys it attends to (Gemma 3's sliding layers; 0: all)
    attn_norm: torch.Tensor | None = None  # on the attention's input (None in OLMo-2)
    attn_post_norm: torch.Tensor | None = None  # on its output (OLMo-2, Gemma 3)
    w_qkv: object = None  # [(nq + 2 nkv) * hd, d] tensor or Int8Weight
    b_qkv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    w_o: object = None
    mlp_norm: torch.Tensor | None = None
    mlp_post_norm: torch.Tensor | None = None
    w_gate_up: object = None  # [2 ff, d]
    w_down: object = None

    @property
    def norms(self):
        return (self.attn_norm, self.attn_post_norm, self.q_norm, self.k_norm, self.mlp_norm, self.mlp_post_norm)


@dataclass
class _Request:
    """One request from submit() to its last event (as csrc/engine.cpp's Request)."""
    id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: tuple[int, ...]
    rng: np.random.Generator
    region: int = -1  # KV row while running
    prefilled: int = 0  # prompt tokens in the cache
    generated: int = 0  # output tokens so far
    pending: int = -1  # the last output token, fed to the next step
    cancelled: bool = False


def _nbytes(w) -> int:
    if w is None:
        return 0
    if isinstance(w, Int8Weight):
        return w.q.numel() + w.scale.numel() * 4
    return w.numel() * w.element_size()


class GpuEngine(TextEngine):
    """The shortrt plan on a GPU (or on CPU tensors, for tests): the API of shortrt.Engine.

    model: a checkpoint directory, "default", a .gguf file, or a shortrt.Model. device: "cuda",
    "cuda:N" or "cpu". dtype: "bf16" (default on CUDA), "fp32" (default on the CPU) or "int8"
    (weight-only, blocks of 32 with an fp32 scale; activations bf16). lm_head_dtype: "auto"/"same"
    (= dtype) or one of DTYPES. kv_dtype: "fp32" or "bf16" (default: fp32 under fp32 weights, else
    bf16). backend: the kernels' "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch),
    "triton" or "torch". max_seq: context (None = min(max_position_embeddings, 2048)). max_batch:
    sequences at once, one KV row each. kv_budget_bytes: size max_batch by KV bytes instead.
    skip_layers: checkpoint layers not to run. prefill_chunk: prompt tokens per prefill pass (None
    = 512). cuda_graphs: capture the decode step per batch size on CUDA (False = eager launches).
    """

    def __init__(self, model="default", *, device="cuda", dtype: str | None = None, backend: str = "auto",
                 max_seq: int | None = None, max_batch: int = 1, skip_layers=None, prefill_chunk: int | None = None,
                 kv_dtype: str | None = None, lm_head_dtype: str = "auto", kv_budget_bytes: int | None = None,
                 cuda_graphs: bool = True):
        dev = resolve_device(device)  # before anything is loaded
        self._set_options(dev, dtype, backend, kv_dtype, lm_head_dtype, max_seq, max_batch, prefill_chunk,
                          kv_budget_bytes, cuda_graphs)
        m = checkpoint.load(model)
        self.model = m
        self.checkpoint_dir: Path | None = m.path
        self._build(m.model_config, m.plan(skip_layers or ()), m.read_rows)

    @classmethod
    def from_weights(cls, config: checkpoint.ModelConfig, plan, read, **options) -> "GpuEngine":
        """An engine over weights that are not in a checkpoint (benchmarks/gpu.py's random ones):
        read(name, dtype=...) -> the tensor a checkpoint would hold under that name. Token ids only."""
        self = cls.__new__(cls)
        dev = resolve_device(options.pop("device", "cuda"))
        self._set_options(dev, options.pop("dtype", None), options.pop("backend", "auto"),
                          options.pop("kv_dtype", None), options.pop("lm_head_dtype", "auto"),
                          options.pop("max_seq", None), options.pop("max_batch", 1),
                          options.pop("prefill_chunk", None), options.pop("kv_budget_bytes", None),
                          options.pop("cuda_graphs", True))
        if options:
            raise TypeError(f"from_weights got unexpected options {sorted(options)}")
        self.model, self.checkpoint_dir = None, None
        self._build(config, tuple(plan), read)
        return self

    # --- construction -------------------------------------------------------
    def _set_options(self, dev, dtype, backend, kv_dtype, lm_head_dtype, max_seq, max_batch, prefill_chunk,
                     kv_budget_bytes, cuda_graphs):
        """Every argument checked (ValueError naming it) before the checkpoint is read."""
        self.device = dev
        if dtype is None:
            dtype = "bf16" if dev.type == "cuda" else "fp32"
        if dtype == "int4":
            raise ValueError("dtype 'int4' is not supported by the GPU engine (it runs fp32, bf16 and int8); "
                             "int4 runs on the CPU runtime (device='cpu')")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (the GPU engine runs {', '.join(DTYPES)})")
        if lm_head_dtype not in LM_HEAD_DTYPES:
            raise ValueError(f"lm_head_dtype {lm_head_dtype!r} is not supported by the GPU engine "
                             f"(expected one of {', '.join(LM_HEAD_DTYPES)})")
        if kv_dtype is None:
            kv_dtype = "fp32" if dtype == "fp32" else "bf16"
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not supported by the GPU engine (it keeps the KV cache in "
                             f"{' or '.join(KV_DTYPES)}; f16 and int8 KV caches run on the CPU runtime)")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        try:
            self._kernel_backend = choose_backend("engine", backend, dev)
        except KernelUnavailableError as exc:
            raise ValueError(f"backend='triton' cannot run on {dev}: {exc}") from None
        if max_seq is not None:
            max_seq = _int_arg("max_seq", max_seq, 1, _INT32_MAX, " (a positive context length)")
        max_batch = _int_arg("max_batch", max_batch, 1, 4096, " (a positive number of sequences)")
        if prefill_chunk is not None:
            prefill_chunk = _int_arg("prefill_chunk", prefill_chunk, 1, _INT32_MAX, " (prompt tokens per chunk)")
        if kv_budget_bytes is not None:
            kv_budget_bytes = _int_arg("kv_budget_bytes", kv_budget_bytes, 1, 2**62)
        act = torch.float32 if dtype == "fp32" else torch.bfloat16
        if dev.type == "cuda" and act == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise DeviceUnavailableError(f"{torch.cuda.get_device_name(dev)} has no bfloat16 support, which dtype "
                                         f"{dtype!r} needs; use dtype='fp32'")
        self.dtype, self.kv_dtype, self.backend = dtype, kv_dtype, backend
        self.lm_head_dtype = dtype if lm_head_dtype in ("auto", "same") else lm_head_dtype
        self.act_dtype = act
        self._options = dict(max_seq=max_seq, max_batch=max_batch, prefill_chunk=prefill_chunk,
                             kv_budget_bytes=kv_budget_bytes)
        self._want_graphs = bool(cuda_graphs) and dev.type == "cuda"

    def _build(self, cfg: checkpoint.ModelConfig, plan, read) -> None:
        o = self._options
        if cfg.architecture not in GPU_ARCHITECTURES:
            raise CheckpointError(f"the GPU engine runs {', '.join(sorted(GPU_ARCHITECTURES))} checkpoints, not "
                                  f"{cfg.architecture} (its layer structure is not built here); run it on the CPU "
                                  "runtime (device='cpu')")
        if cfg.rope_type not in GPU_ROPE_TYPES:
            raise CheckpointError(f"the GPU engine does not implement rope scaling {cfg.rope_type!r} (it runs "
                                  f"{', '.join(GPU_ROPE_TYPES)}); run it on the CPU runtime (device='cpu')")
        self.cfg = cfg
        self.plan = plan
        max_seq = o["max_seq"] or min(cfg.max_position, DEFAULT_MAX_SEQ)
        if max_seq > cfg.max_position:
            raise CheckpointError(f"max_seq {max_seq} exceeds the model's max_position_embeddings {cfg.max_position}")
        # Gemma 3's sliding layers (layer_types) attend through their window; a window over every layer
        # (Mistral, Phi-3) is refused past it, as the C++ runtime does.
        if cfg.sliding_window and not cfg.layer_types and max_seq > cfg.sliding_window:
            raise CheckpointError(f"max_seq {max_seq} exceeds the sliding window of {cfg.sliding_window} "
                                  "(sliding-window attention is not implemented)")
        if "int8" in (self.dtype, self.lm_head_dtype):
            odd = [w for w in (cfg.hidden, cfg.intermediate, cfg.n_heads * cfg.head_dim) if w % 32]
            if odd:
                raise CheckpointError(f"int8 weights need input widths that are multiples of 32; this model has {odd[0]}")
        self.max_seq = max_seq
        self.prefill_chunk = min(o["prefill_chunk"] or DEFAULT_PREFILL_CHUNK, max_seq)
        n_slots = sum(1 for s in plan if s.attention)
        kv_elem = torch.finfo(_TORCH_DTYPES[self.kv_dtype]).bits // 8
        per_seq = 2 * n_slots * max_seq * cfg.n_kv_heads * cfg.head_dim * kv_elem
        max_batch = o["max_batch"]
        if o["kv_budget_bytes"] is not None:
            max_batch = min(4096, o["kv_budget_bytes"] // per_seq) if per_seq else 4096
            if max_batch < 1:
                raise ValueError(f"kv_budget_bytes {o['kv_budget_bytes'] / 2**20:.1f} MiB holds no sequence: one needs "
                                 f"{per_seq / 2**20:.1f} MiB of KV cache at max_seq (lower max_seq or raise the budget)")
        self.max_batch = max_batch
        self._load_weights(cfg, plan, read)
        dev, kv = self.device, _TORCH_DTYPES[self.kv_dtype]
        # K and V of slot s: k_cache[s], v_cache[s], each [rows, n_kv_heads, max_seq, head_dim].
        # A sliding layer's slot holds max_seq positions too (the C++ runtime keeps a ring of about the
        # window): the kernels address the cache by position; its attention reads only the window.
        self.k_cache = torch.zeros(n_slots, max_batch, cfg.n_kv_heads, max_seq, cfg.head_dim, dtype=kv, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.kv_cache_bytes = 2 * self.k_cache.numel() * kv_elem
        positions = torch.arange(max_seq, dtype=torch.float32)[:, None]
        angles = positions * rope_inv_freq(cfg)[None, :]  # fp32 product
        self.rope_cos = angles.cos().to(dev)  # [max_seq, rotary_dim / 2]
        self.rope_sin = angles.sin().to(dev)
        self.rope_local = None  # Gemma 3's sliding layers: (cos, sin) of their own plain RoPE base
        if cfg.rope_local_theta:
            local = positions * rope_inv_freq(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                                                  rope_type="default"))[None, :]
            self.rope_local = (local.cos().to(dev), local.sin().to(dev))
        self.rotary_dim = cfg.rotary_dim or cfg.head_dim
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self._graphs: dict[tuple[int, bool], _GraphStep] = {}  # by (batch size, greedy)
        self.graph_error: str | None = None  # why decoding runs without CUDA graphs, once capture failed
        # Requests (as csrc/engine.cpp): _lock guards what follows, _step_lock makes steps one at a time.
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._call_lock = threading.Lock()  # one generate / stream / logits call at a time
        self._owner: int | None = None  # the thread inside that call
        self._cancel_epoch = 0
        self._next_id = 1
        self._queued: list[_Request] = []
        self._running: list[_Request | None] = [None] * max_batch  # by KV row
        self._free = list(range(max_batch - 1, -1, -1))
        self._order: list[int] = []  # running requests in arrival order
        self._undelivered: list[tuple[int, int, str]] = []
        self._in_step = False
        self._tokens_generated = self._requests_finished = self._steps = 0
        self._tokenizer = None
        self._chat_tokenizer = None

    def _load_weights(self, cfg, plan, read) -> None:
        """Each planned tensor read once (in the file's precision or fp32), fused, packed, moved."""
        dev, act = self.device, self.act_dtype
        read_dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32

        def small(name):  # biases: in the activations' dtype
            return read(name, dtype=torch.float32).to(device=dev, dtype=act)

        def norm_weight(name):
            # fp32, as the C++ runtime keeps them: the kernels compute in fp32 anyway, and in bf16 a w near 1
            # would lose the low bits of Gemma's 1 + w.
            return read(name, dtype=torch.float32).to(dev)

        def matrix(names, fmt, dtype=read_dtype):
            parts = [read(n, dtype=dtype) for n in names]
            w = torch.cat(parts) if len(parts) > 1 else parts[0]
            if fmt == "int8":
                return quantize_int8(w.to(device=dev, dtype=torch.float32))
            return w.to(device=dev, dtype=_TORCH_DTYPES[fmt]).contiguous()

        # Each sublayer's norms by family (checkpoint.expected_tensors names the same tensors): Llama-style
        # input_layernorm / post_attention_layernorm before the attention / MLP; OLMo-2 post_attention_layernorm
        # / post_feedforward_layernorm after them; Gemma 3 input / pre_feedforward before and post_attention /
        # post_feedforward after.
        if cfg.post_norm:
            attn_pre, attn_post, mlp_pre, mlp_post = None, "post_attention_layernorm", None, "post_feedforward_layernorm"
        elif cfg.sandwich_norm:
            attn_pre, attn_post = "input_layernorm", "post_attention_layernorm"
            mlp_pre, mlp_post = "pre_feedforward_layernorm", "post_feedforward_layernorm"
        else:
            attn_pre, attn_post, mlp_pre, mlp_post = "input_layernorm", None, "post_attention_layernorm", None

        def norm(p, name):
            return norm_weight(p + name + ".weight") if name else None

        layers, slot = [], 0
        for step in plan:
            p = f"model.layers.{step.index}."
            layer = _Layer(step.index)
            if step.attention:
                a = p + "self_attn."
                layer.slot, slot = slot, slot + 1
                layer.window = cfg.sliding_window if cfg.is_sliding(step.index) else 0
                layer.attn_norm, layer.attn_post_norm = norm(p, attn_pre), norm(p, attn_post)
                names = ([a + "qkv_proj.weight"] if cfg.fused_projections else
                         [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
                layer.w_qkv = matrix(names, self.dtype)
                if cfg.qkv_bias:
                    layer.b_qkv = torch.cat([small(a + f"{n}_proj.bias") for n in "qkv"])
                if cfg.qk_norm:
                    layer.q_norm, layer.k_norm = norm_weight(a + "q_norm.weight"), norm_weight(a + "k_norm.weight")
                layer.w_o = matrix([a + "o_proj.weight"], self.dtype)
            if step.mlp:
                layer.mlp_norm, layer.mlp_post_norm = norm(p, mlp_pre), norm(p, mlp_post)
                names = ([p + "mlp.gate_up_proj.weight"] if cfg.fused_projections else
                         [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])  # gate rows, then up rows
                layer.w_gate_up = matrix(names, self.dtype)
                layer.w_down = matrix([p + "mlp.down_proj.weight"], self.dtype)
            layers.append(layer)
        self.layers = layers
        self.final_norm = norm_weight("model.norm.weight")
        lm_read = torch.bfloat16 if self.lm_head_dtype == "bf16" else torch.float32
        self.embed = matrix(["model.embed_tokens.weight"], self.dtype)
        if cfg.tie_embeddings and self.lm_head_dtype == self.dtype:
            self.lm_head = self.embed  # one copy serves both
        else:
            name = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
            self.lm_head = matrix([name], self.lm_head_dtype, lm_read)
        per_layer = [sum(_nbytes(w) for w in (*l.norms, l.w_qkv, l.b_qkv, l.w_o, l.w_gate_up, l.w_down))
                     for l in layers]
        self.weight_bytes_per_token = sum(per_layer) + _nbytes(self.final_norm) + _nbytes(self.lm_head)
        self.weight_bytes = self.weight_bytes_per_token + (0 if self.lm_head is self.embed else _nbytes(self.embed))

    # --- properties -------------------------------------------------------
    def __repr__(self) -> str:
        return (f"GpuEngine({str(self.checkpoint_dir)!r}, device={str(self.device)!r}, dtype={self.dtype!r}, "
                f"kv_dtype={self.kv_dtype!r}, lm_head_dtype={self.lm_head_dtype!r}, layers={self.num_layers}, "
                f"max_seq={self.max_seq}, max_batch={self.max_batch})")

    @property
    def config(self) -> dict:
        c = self.cfg
        return {"architecture": c.architecture, "hidden_size": c.hidden, "intermediate_size": c.intermediate,
                "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab,
                "max_position_embeddings": c.max_position, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
                "rope_type": c.rope_type, "tie_word_embeddings": c.tie_embeddings,
                "eos_token_ids": list(c.eos_token_ids)}

    @property
    def num_layers(self) -> int:
        """Decoder layers executed per token."""
        return len(self.layers)

    @property
    def num_attention_layers(self) -> int:
        """Attentions with a KV cache slot."""
        return self.k_cache.shape[0]

    @property
    def layers_run(self) -> list[int]:
        return [l.index for l in self.layers]

    @property
    def step_tokens(self) -> int:
        return self.max_batch + self.prefill_chunk

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (False on the CPU, when turned off, or after capture failed)."""
        return self._want_graphs and self.graph_error is None

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queued or self._undelivered or any(r is not None for r in self._running))

    # --- the model --------------------------------------------------------
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e, embed_scale = self.embed, self.cfg.embed_scale
        if isinstance(e, Int8Weight):  # dequantize the rows looked up (blocks of 32, one fp32 product each)
            rows = (e.q[tokens].float().unflatten(-1, (-1, 32)) * e.scale[tokens][..., None]).flatten(-2)
        else:
            rows = e[tokens]
        if embed_scale != 1.0:  # Gemma 3: times sqrt(hidden), an fp32 product
            rows = rows.float() * embed_scale
        return rows.to(self.act_dtype)

    def _linear(self, x, w):
        return linear(x, w, backend=self._kernel_backend)

    def _prefill_linear(self, x, w):
        """x @ w^T for many rows: int8 weights are dequantized to a matmul's operand above a few rows."""
        if isinstance(w, Int8Weight) and x.shape[0] > INT8_PREFILL_DEQUANT_ROWS:
            return torch.matmul(x, w.dequantize().to(x.dtype).t())
        return self._linear(x, w)

    def _norm(self, x, w):
        """RMSNorm of x's rows by w; None (a norm the family does not have there) is the identity."""
        if w is None:
            return x
        return rmsnorm(x, w, self.cfg.rms_eps, plus_one=self.cfg.norm_unit_offset, backend=self._kernel_backend)

    def _mlp(self, layer, h, lin):
        x = self._norm(h, layer.mlp_norm)
        act = "gelu_tanh" if self.cfg.gelu_tanh else "silu"
        y = lin(swiglu(lin(x, layer.w_gate_up), act=act, backend=self._kernel_backend), layer.w_down)
        return h + self._norm(y, layer.mlp_post_norm)

    def _rope_tables(self, layer):
        return self.rope_local if layer.window and self.rope_local is not None else (self.rope_cos, self.rope_sin)

    def _lm_head(self, h, lin):
        logits = lin(self._norm(h, self.final_norm), self.lm_head).float()
        cap = self.cfg.final_softcap
        if cap:  # Gemma 3: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _forward_decode(self, ints: torch.Tensor, floats: torch.Tensor, greedy: bool = False):
        """One token for each of B sequences. ints [4, B] int64: token, position, KV row, top_k;
        floats [3, B] fp32: temperature, top_p, uniform. Returns (logits [B, vocab] fp32, next [B] int64).
        greedy: every row has temperature 0, so the next token is the argmax (lowest index on ties,
        as sample() picks at temperature 0) without the sampler's passes over the vocabulary.
        Only kernels and shape-determined work: this is what a CUDA graph captures."""
        cfg, kb = self.cfg, self._kernel_backend
        tokens, positions, rows, top_k = ints[0], ints[1], ints[2], ints[3]
        lengths = positions + 1
        h = self._embed(tokens)
        for layer in self.layers:
            if layer.w_qkv is not None:
                x = self._norm(h, layer.attn_norm)
                kc, vc = self.k_cache[layer.slot], self.v_cache[layer.slot]
                cos, sin = self._rope_tables(layer)
                q = qkv_rope_write(x, layer.w_qkv, layer.b_qkv, cos, sin, positions, kc, vc, rows,
                                   cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, q_norm=layer.q_norm,
                                   k_norm=layer.k_norm, norm_eps=cfg.rms_eps, norm_plus_one=cfg.norm_unit_offset,
                                   norm_whole=cfg.qk_norm_whole, rotary_dim=self.rotary_dim, backend=kb)
                a = decode_attention(q, kc, vc, rows, lengths, self.scale, window=layer.window, backend=kb)
                h = h + self._norm(self._linear(a.reshape(a.shape[0], -1), layer.w_o), layer.attn_post_norm)
            if layer.w_gate_up is not None:
                h = self._mlp(layer, h, self._linear)
        logits = self._lm_head(h, self._linear)
        return logits, self._next_tokens(logits, top_k, floats, greedy)

    def _next_tokens(self, logits, top_k, floats, greedy: bool):
        if greedy:
            return logits.argmax(dim=1)
        return sample(logits, floats[0], top_k, floats[1], floats[2], backend=self._kernel_backend)

    def _forward_prefill(self, row: int, ids: list[int], start: int, all_logits: bool) -> torch.Tensor:
        """Prompt tokens ids at positions start.. of KV row `row`: K/V written, logits [T or 1, vocab] fp32."""
        cfg, dev = self.cfg, self.device
        T, nq, nkv, hd = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        h = self._embed(torch.tensor(ids, dtype=torch.int64, device=dev))
        end = start + T

        def table(cos, sin):  # [T, 1, rotary_dim] rows of positions start..end-1, as reference.rope takes them
            return (torch.cat([cos[start:end]] * 2, dim=-1)[:, None, :],
                    torch.cat([sin[start:end]] * 2, dim=-1)[:, None, :])

        tables = {False: table(self.rope_cos, self.rope_sin)}
        if self.rope_local is not None:
            tables[True] = table(*self.rope_local)
        query = torch.arange(start, end, device=dev)[:, None]
        # By window (0: causal only): the first key position read, and the mask over keys first..end-1.
        masks = {0: (0, None if start == 0 else torch.arange(end, device=dev)[None, :] <= query)}
        for layer in self.layers:
            if layer.w_qkv is not None:
                x = self._norm(h, layer.attn_norm)
                qkv = self._prefill_linear(x, layer.w_qkv)
                if layer.b_qkv is not None:
                    qkv = qkv + layer.b_qkv
                q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
                if layer.q_norm is not None and cfg.qk_norm_whole:  # OLMo-2: all of q, all of k
                    q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
                q, k, v = q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
                if layer.q_norm is not None and not cfg.qk_norm_whole:  # Qwen3, Gemma 3: each head
                    q = self._norm(q.reshape(-1, hd), layer.q_norm).reshape(T, nq, hd)
                    k = self._norm(k.reshape(-1, hd), layer.k_norm).reshape(T, nkv, hd)
                cos, sin = tables[bool(layer.window) and self.rope_local is not None]
                q = rope(q.float(), cos, sin).to(h.dtype)  # the first rotary_dim dims of each head
                k = rope(k.float(), cos, sin).to(h.dtype)
                if layer.window not in masks:  # key j visible from query i when i - window < j <= i
                    first = max(0, start - layer.window + 1)  # keys before it are out of every query's window
                    key = torch.arange(first, end, device=dev)[None, :]
                    masks[layer.window] = (first, (key <= query) & (key > query - layer.window))
                first, mask = masks[layer.window]
                kc, vc = self.k_cache[layer.slot, row], self.v_cache[layer.slot, row]  # [nkv, S, hd]
                kc[:, start:end] = k.transpose(0, 1).to(kc.dtype)
                vc[:, start:end] = v.transpose(0, 1).to(vc.dtype)
                keys, values = kc[None, :, first:end].to(h.dtype), vc[None, :, first:end].to(h.dtype)
                a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                   is_causal=mask is None, scale=self.scale, enable_gqa=True)
                o = self._prefill_linear(a[0].transpose(0, 1).reshape(T, nq * hd), layer.w_o)
                h = h + self._norm(o, layer.attn_post_norm)
            if layer.w_gate_up is not None:
                h = self._mlp(layer, h, self._prefill_linear)
        if not all_logits:
            h = h[-1:]
        return self._lm_head(h, self._prefill_linear)

    def _decode(self, ints: np.ndarray, floats: np.ndarray):
        """_forward_decode for host inputs: a replayed CUDA graph when one is (or can be) captured."""
        B, greedy = ints.shape[1], not floats[0].any()
        if self.cuda_graphs:
            graph = self._graphs.get((B, greedy))
            if graph is None:
                graph = self._capture(B, greedy)
            if graph is not None:
                return graph.run(ints, floats)
        return self._forward_decode(torch.from_numpy(ints).to(self.device), torch.from_numpy(floats).to(self.device),
                                    greedy)

    def _capture(self, B: int, greedy: bool):
        """The CUDA graph of the decode step for B sequences (greedy or sampling), or None (and graph_error set, a line on
        stderr) when capture fails; decoding then launches the kernels one by one."""
        try:
            graph = _GraphStep(self, B, greedy)
        except Exception as exc:  # the kernels could not be captured: run eagerly, say so once
            torch.cuda.synchronize(self.device)
            self.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"shortrt: CUDA-graph capture of the decode step failed ({self.graph_error}); "
                  "decoding without graphs (slower)", file=sys.stderr)
            return None
        self._graphs[B, greedy] = graph
        return graph

    # --- requests (continuous batching) -------------------------------------
    def _check_tokens(self, ids: list[int], what: str) -> None:
        if not ids:
            raise ValueError(f"{what} is empty")
        for j, t in enumerate(ids):
            if not 0 <= t < self.cfg.vocab:
                raise ValueError(f"token id {t} at position {j} of {what} is outside the vocabulary of {self.cfg.vocab}")

    def _check_request(self, prompt: list[int], max_new_tokens: int, what: str) -> None:
        self._check_tokens(prompt, what)
        if len(prompt) + max_new_tokens > self.max_seq:
            raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context of "
                             f"{self.max_seq}")

    def _enqueue(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop) -> int:
        """Call with _lock held."""
        r = _Request(self._next_id, prompt, max_new_tokens, temperature, top_k, top_p,
                     tuple(self.cfg.eos_token_ids if stop is None else stop), np.random.Generator(np.random.PCG64(seed)))
        self._next_id += 1
        if max_new_tokens == 0:
            self._undelivered.append((r.id, -1, "length"))
            self._requests_finished += 1
        else:
            self._queued.append(r)
        return r.id

    def _release(self, r: _Request, why: str, token: int) -> None:
        """Call with _lock held: ends running request r, frees its KV row at once."""
        self._undelivered.append((r.id, token, why))
        self._requests_finished += 1
        self._running[r.region] = None
        self._free.append(r.region)

    def _admit(self) -> None:
        for r in self._running:
            if r is not None and r.cancelled:
                self._release(r, "cancelled", -1)
        while self._queued and self._free:
            r = self._queued.pop(0)
            r.region = self._free.pop()
            self._running[r.region] = r
            self._order.append(r.id)

    def submit(self, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop=None) -> int:
        """Queue a request (token ids); returns its id. Thread-safe. As shortrt.Engine.submit."""
        max_new_tokens, temperature, top_k, top_p, seed = _check_sampling(
            max_new_tokens, temperature, top_k, top_p, seed)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        self._check_request(ids, max_new_tokens, "the prompt")
        stop_ids = self._stop_ids(stop)
        with self._lock:
            return self._enqueue(ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids)

    def step(self) -> list[tuple[int, int, str | None]]:
        """One pass over every running request: [(request id, token, finish)], as shortrt.Engine.step.

        The decoding requests advance one token together (one decode step, a CUDA graph on CUDA);
        prompts waiting for their first token prefill one chunk each, in arrival order, while the
        step's prompt tokens stay within prefill_chunk (at least one chunk runs)."""
        events: list[tuple[int, int, str | None]] = []
        with self._step_lock:
            with self._lock:
                self._admit()
                decoding = [r for r in self._running if r is not None and r.pending >= 0]
                prefilling, budget = [], self.prefill_chunk
                for rid in self._order:
                    r = next((x for x in self._running if x is not None and x.id == rid), None)
                    if r is None or r.pending >= 0:
                        continue
                    n = min(self.prefill_chunk, len(r.prompt) - r.prefilled)
                    if prefilling and n > budget:
                        break
                    prefilling.append((r, n))
                    budget -= n
                self._in_step = bool(decoding or prefilling)
            if self._in_step:
                try:
                    sampled = self._run_step(decoding, prefilling)
                except BaseException:
                    with self._lock:
                        self._in_step = False
                    raise
                with self._lock:
                    self._in_step = False
                    self._steps += 1
                    self._finish_step(sampled, events)
            with self._lock:
                events += self._undelivered
                self._undelivered = []
        return events

    def _sampling_inputs(self, reqs) -> tuple[list[int], list[list[float]]]:
        top_k = [r.top_k if r.top_k < self.cfg.vocab else 0 for r in reqs]
        temps = [r.temperature if r.temperature >= MIN_TEMPERATURE else 0.0 for r in reqs]
        uniform = [min(float(r.rng.random()), 1 - 2**-24) if t > 0 else 0.0 for r, t in zip(reqs, temps)]
        return top_k, [temps, [r.top_p for r in reqs], uniform]

    def _run_step(self, decoding, prefilling) -> list[tuple[_Request, int]]:
        sampled = []
        if decoding:
            top_k, floats = self._sampling_inputs(decoding)
            ints = np.array([[r.pending for r in decoding],
                             [len(r.prompt) + r.generated - 1 for r in decoding],
                             [r.region for r in decoding], top_k], dtype=np.int64)
            _, tokens = self._decode(ints, np.array(floats, dtype=np.float32))
            sampled += zip(decoding, tokens.tolist())
        for r, n in prefilling:
            logits = self._forward_prefill(r.region, r.prompt[r.prefilled:r.prefilled + n], r.prefilled, False)
            r.prefilled += n
            if r.prefilled == len(r.prompt):
                top_k, floats = self._sampling_inputs([r])
                f = torch.tensor(floats, dtype=torch.float32, device=self.device)
                token = self._next_tokens(logits, torch.tensor(top_k, device=self.device), f, floats[0][0] == 0)
                sampled.append((r, int(token[0])))
        return sampled

    def _finish_step(self, sampled, events) -> None:
        """Call with _lock held: the step's tokens become events (as csrc/engine.cpp's step)."""
        for r, token in sampled:
            if r.cancelled:
                continue  # released below
            if token in r.stop:
                self._release(r, "stop", -1)
                continue
            r.generated += 1
            self._tokens_generated += 1
            if r.generated >= r.max_new_tokens:
                self._release(r, "length", token)
                continue
            r.pending = token
            events.append((r.id, token, None))
        for r in self._running:
            if r is not None and r.cancelled:
                self._release(r, "cancelled", -1)
        live = {r.id for r in self._running if r is not None}
        self._order = [i for i in self._order if i in live]

    def cancel(self, request_id: int) -> None:
        """End a request from any thread; its KV row is freed at once (or by the step in flight).
        Unknown or finished ids are ignored."""
        request_id = int(request_id)
        with self._lock:
            for i, r in enumerate(self._queued):
                if r.id == request_id:
                    del self._queued[i]
                    self._undelivered.append((request_id, -1, "cancelled"))
                    self._requests_finished += 1
                    return
            for r in self._running:
                if r is not None and r.id == request_id:
                    r.cancelled = True
                    if not self._in_step:
                        self._release(r, "cancelled", -1)
                    return

    def cancel_all(self) -> None:
        """Cancel every submitted request and make generate()/stream() calls in flight return."""
        with self._lock:
            self._cancel_epoch += 1
            ids = [r.id for r in self._queued] + [r.id for r in self._running if r is not None]
        for i in ids:
            self.cancel(i)

    def stats(self) -> dict:
        """shortrt.Engine.stats()'s keys, plus device and cuda_graphs."""
        with self._lock:
            running = sum(r is not None for r in self._running)
            return {"running": running, "queued": len(self._queued), "max_batch": self.max_batch,
                    "kv_regions_used": running, "kv_bytes": self.kv_cache_bytes,
                    "kv_bytes_used": self.kv_cache_bytes // self.max_batch * running,
                    "tokens_generated": self._tokens_generated, "requests_finished": self._requests_finished,
                    "steps": self._steps, "device": str(self.device), "cuda_graphs": self.cuda_graphs}

    # --- generation -------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, what: str):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(f"Engine.{what} called from inside this engine's own callback (the engine is busy with "
                               "the call that runs the callback); collect the tokens and call it after it returns")
        with self._call_lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _events(self, prompts, options, stop_ids):
        """Runs prompts as requests, stepping the engine: yields (seq, request id, token, finish) for
        each of their events in order. Unfinished ones are cancelled when the caller stops; events of
        other callers' requests are kept for their step()."""
        max_new_tokens, temperature, top_k, top_p, seed = options
        with self._call("generate"):
            with self._lock:
                epoch = self._cancel_epoch
                ids = [self._enqueue(p, max_new_tokens, temperature, top_k, top_p, seed, stop_ids) for p in prompts]
            where = {rid: b for b, rid in enumerate(ids)}
            unfinished, foreign = set(ids), []
            try:
                while unfinished and self._cancel_epoch == epoch:
                    for rid, token, finish in self.step():
                        if rid not in where:
                            foreign.append((rid, token, finish))
                        elif rid in unfinished:
                            if finish is not None:
                                unfinished.discard(rid)
                            yield where[rid], rid, token, finish
            finally:
                for rid in unfinished:
                    self.cancel(rid)
                with self._lock:
                    self._undelivered = foreign + [e for e in self._undelivered if e[0] not in where]

    def generate_ids(self, ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop=None, callback=None):
        """New token ids for one prompt (list of ids) or several (list of lists), as
        shortrt.Engine.generate_ids: same arguments, errors, stop and callback rules."""
        options = _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        single, prompts = prompt_lists(ids)
        stop_ids = self._stop_ids(stop)
        results: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):  # groups of max_batch sequences
            group = prompts[start:start + self.max_batch]
            for i, p in enumerate(group):  # every prompt of a group is checked before any runs
                self._check_request(p, options[0], "the prompt" if len(group) == 1 else f"prompt {i}")
            out: list[list[int]] = [[] for _ in group]
            stopped: set[int] = set()
            events = self._events(group, options, stop_ids)
            try:
                for b, rid, token, finish in events:
                    if b in stopped or token < 0:
                        continue
                    out[b].append(token)
                    if callback is not None:
                        go_on = callback(start + b, token)
                        if finish is None and go_on is not None and not go_on:  # stopped: its token is kept
                            stopped.add(b)
                            self.cancel(rid)
            finally:
                events.close()
            results += out
        return results[0] if single else results

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop=None, chat: bool = False):
        """Yields text pieces as tokens are produced; "".join(pieces) == generate(prompt, ...).
        Runs the steps in the consuming thread; closing the iterator early cancels the request."""
        options = _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.encode(prompt, chat=chat)
        if not ids:
            raise ValueError(f"empty prompt: {prompt!r} encodes to no tokens")
        stop_ids = self._stop_ids(stop)
        self._check_request(ids, options[0], "the prompt")
        detok = Detokenizer(self.tokenizer)
        events = self._events([ids], options, stop_ids)
        try:
            for _, _, token, _ in events:
                if token >= 0:
                    piece = detok.push(token)
                    if piece:
                        yield piece
        finally:
            events.close()
        tail = detok.flush()
        if tail:
            yield tail

    def logits(self, ids, chunk: int = 0) -> np.ndarray:
        """float32 logits of every position, shape [len(ids), vocab], in a free KV row.

        chunk: tokens per prefill pass; 0 = prefill_chunk; 1 = one token at a time through the
        decode step (the kernels, a CUDA graph on CUDA), exactly as decoding runs."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        chunk = _int_arg("chunk", chunk, 0, _INT32_MAX, " (0 = the prefill chunk)")
        self._check_tokens(ids, "the token list")
        if len(ids) > self.max_seq:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_seq}")
        with self._call("logits"), self._step_lock:
            with self._lock:
                if not self._free:
                    raise ValueError("logits() needs a free KV region; every one is running a request")
                row = self._free[-1]
            out = []
            if chunk == 1:
                zeros = np.zeros((3, 1), dtype=np.float32)
                zeros[1] = 1.0  # top_p
                for p, t in enumerate(ids):
                    logits, _ = self._decode(np.array([[t], [p], [row], [0]], dtype=np.int64), zeros)
                    out.append(logits.clone())
            else:
                c = chunk or self.prefill_chunk
                for begin in range(0, len(ids), c):
                    out.append(self._forward_prefill(row, ids[begin:begin + c], begin, True))
            return torch.cat(out).cpu().numpy()


class _GraphStep:
    """The decode step for B sequences captured in a CUDA graph over static input buffers.

    Warm-up passes (on a side stream, as CUDA-graph capture asks; they compile the Triton kernels) and
    the capture write K/V at position max_seq - 1 of rows 0..B-1: no request ever reads that position
    before writing it (a request's last fed token sits at prompt + max_new_tokens - 2 <= max_seq - 2,
    and logits() writes each position before attending to it)."""

    def __init__(self, engine: GpuEngine, B: int, greedy: bool):
        dev = engine.device
        self.ints = torch.zeros(4, B, dtype=torch.int64, device=dev)
        self.floats = torch.zeros(3, B, dtype=torch.float32, device=dev)
        self.ints[1] = engine.max_seq - 1
        self.ints[2] = torch.arange(B, device=dev)
        self.floats[1] = 1.0
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                engine._forward_decode(self.ints, self.floats, greedy)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # its own memory pool: graphs of other batch sizes never alias it
            self.logits, self.next = engine._forward_decode(self.ints, self.floats, greedy)
        self._host_ints = torch.empty(4, B, dtype=torch.int64).pin_memory()
        self._host_floats = torch.empty(3, B, dtype=torch.float32).pin_memory()

    def run(self, ints: np.ndarray, floats: np.ndarray):
        self._host_ints.numpy()[:] = ints
        self._host_floats.numpy()[:] = floats
        self.ints.copy_(self._host_ints, non_blocking=True)
        self.floats.copy_(self._host_floats, non_blocking=True)
        self.graph.replay()
        return self.logits, self.next.cpu()
