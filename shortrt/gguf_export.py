"""GGUF in and out: any shortrt checkpoint for llama.cpp / ollama, pruned copies of a GGUF, and a
GGUF source read into a checkpoint.

    export_gguf("out/smollm2-p8", "smollm2-p8.Q8_0.gguf", qtype="q8_0")   # `shortrt export --to gguf`
    prune_gguf("model.gguf", retained=[0, 1, 3], dst="pruned.gguf")          # blocks copied as stored
    gguf_to_checkpoint("model.gguf", tmp_dir)                               # shortrt.load("model.gguf")

This is the one module that writes GGUF, and the one that reads a GGUF's tensors (tensor by tensor,
each dequantized to fp32 in pieces of rows, so memory stays flat in the model's size; see
gguf_to_checkpoint). The architecture written follows the layer map:
- every layer keeps attention and MLP (dense, shortgpt, span, last, random, `replace --kind layer`,
  healed versions of these): the model's own GGUF architecture (`llama` for Llama and Mistral,
  `qwen2`), `block_count` = layers written, per-layer keys scalar;
- some layers have no attention (attention-only pruning, `replace --kind mlp`): llama.cpp's `deci`
  architecture, whose `attention.head_count` / `head_count_kv` are per-layer arrays, 0 meaning
  the layer has no attention (no attn_norm / attn_* tensors, no KV cache). Read from llama.cpp at
  the commit vendored by llama-cpp-python 0.3.36 (0c1e57098bba): src/models/deci.cpp passes the
  hidden state of a head-count-0 layer straight to its MLP, and src/llama-model.cpp's
  load_hparams reads the arrays with get_key_or_arr; conversion/deci.py writes the same keys.

Refused before anything is written, with the reason (`deci` constraints in that llama.cpp):
- a layer that keeps attention but drops its MLP: deci.cpp `continue`s past a layer whose
  feed_forward_length is 0 before adding the attention output to the residual, so that attention
  would be silently discarded;
- layer 0 without attention: llama.cpp derives the head size (n_embd_head_k) from layer 0's head
  count and sets it to 0 when that count is 0;
- Mistral or Phi-3 with a sliding window shorter than the context (llama.cpp's `llama` has none,
  its `phi3` turns the window off).
Qwen2 (q/k/v biases) goes to `deci` too: deci loads the optional attn_q/k/v biases
(create_tensor_qkv) and applies them (build_qkv); Qwen2's rotate-half RoPE becomes deci's
pairwise RoPE by the same q/k row permutation Llama uses, applied to the biases too.

Qwen3 goes to llama.cpp's `qwen3` (src/models/qwen3.cpp: rotate-half RoPE, so no row permutation;
attn_q_norm / attn_k_norm of head_dim values applied per head before RoPE; key_length = head_dim,
which Qwen3 sets apart from hidden / heads; no q/k/v biases). OLMo-2, Phi-3 and Gemma 3 (issue #17)
go to llama.cpp's `olmo2`, `phi3` and `gemma3` (src/models/
olmo2.cpp, phi3.cpp, gemma3.cpp; all rotate-half RoPE there, so no row permutation): OLMo-2's
post-sublayer norms as post_attention_norm / post_ffw_norm and its q/k norms over the whole
projection; Phi-3's fused qkv and gate_up kept fused (attn_qkv, a 2 * n_ff-row ffn_up), partial
rotary as rope.dimension_count; Gemma 3's four norms stored as 1 + w (as llama.cpp's converter
does), one sliding/full flag per block (attention.sliding_window_pattern as an array, so a pruned
model's irregular pattern is exact), the local RoPE base, the logit soft-cap, and
query_pre_attn_scalar, which llama.cpp does not read, folded into attn_q_norm (see
gemma3_q_norm_factor). Layer removal changes only block_count and the per-block arrays. Layers
without attention: Phi-3 with whole-head RoPE goes to `deci` (its fused matrices split); Qwen3, OLMo-2,
Gemma 3 and partial-rotary Phi-3 are refused (deci has none of their norms; deci.cpp asserts
n_rot = head size).

Tensor types (--type): f32 everything; f16 every matrix; q8_0 / q4_0 every matrix whose rows
divide into blocks of 32 (others f16). With q4_0 the token embedding and output matrix are Q8_0
(llama-quantize gives them Q6_K, a K-quant shortrt does not pack). Norm weights, biases and rope
factors are always f32. general.quantized_by names the code that quantized (gguf_quants.encoder()).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import gguf_quants, gguf_vocab
from .checkpoint import Model, ModelConfig, default_gguf_path, expected_tensors, load, staging_file
from .errors import MissingDependencyError, ShortrtError
from .layermap import LayerMap

TYPES = gguf_quants.TYPES + ("source",)
FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3", "Olmo2ForCausalLM": "olmo2", "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3"}
# Families whose layers llama.cpp's deci can hold without attention (Llama's block, q/k/v biases optional).
_DECI_FAMILIES = ("llama", "qwen2", "phi3")
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # enum llama_ftype
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv",
                   "attention.sliding_window_pattern")


class ExportError(ShortrtError, ValueError):
    """The checkpoint (or its combination with the requested format) cannot be exported."""


# ============================================================================ what is written

@dataclass(frozen=True)
class Layout:
    """The GGUF architecture and per-block head counts of an export."""
    arch: str
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: int

    @property
    def heterogeneous(self) -> bool:
        return self.arch == "deci"


def gguf_layout(cfg: ModelConfig, lmap: LayerMap) -> Layout:
    """The architecture a checkpoint exports to, or ExportError saying why it cannot be."""
    family = FAMILY.get(cfg.architecture)
    if family is None:
        raise ExportError(f"{cfg.architecture} has no GGUF export (export writes {', '.join(FAMILY)})")
    if family != "gemma3" and cfg.sliding_window and cfg.sliding_window < cfg.max_position:
        raise ExportError(f"a sliding window of {cfg.sliding_window} tokens (< the {cfg.max_position}-token "
                          f"context) has no equivalent in llama.cpp's {family} architecture"
                          + (" (src/models/phi3.cpp turns Phi-3's window off)" if family == "phi3" else ""))
    if family in ("olmo2", "phi3") and cfg.n_heads * cfg.head_dim != cfg.hidden:
        raise ExportError(f"{cfg.architecture} with head_dim {cfg.head_dim} x {cfg.n_heads} heads != hidden_size "
                          f"{cfg.hidden}: llama.cpp's {family} sizes q and the attention output by hidden_size "
                          f"(src/models/{family}.cpp)")
    if cfg.rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"rope scaling '{cfg.rope_type}' (Phi-3's long-context RoPE: short and long factor "
                          "tensors chosen by the sequence length) is not written by the GGUF export; a GGUF "
                          "with plain RoPE would run a different model past the original context")
    if family != "llama" and cfg.rope_type == "llama3":
        raise ExportError(f"llama3 RoPE scaling (a rope_freqs tensor) is read by llama.cpp's llama architecture "
                          f"only, not by {family}")
    no_mlp = [i for i, e in enumerate(lmap.layers) if not e.mlp]
    if no_mlp:
        raise ExportError(f"layers {no_mlp} keep attention but have no MLP; llama.cpp's deci architecture skips "
                          "such a layer's attention output (src/models/deci.cpp), so the GGUF would run a "
                          "different model")
    heads = tuple(cfg.n_heads if e.attention else 0 for e in lmap.layers)
    kv = tuple(cfg.n_kv_heads if e.attention else 0 for e in lmap.layers)
    if all(heads):
        return Layout(family, heads, kv, cfg.intermediate)
    if family not in _DECI_FAMILIES:
        missing = [i for i, h in enumerate(heads) if not h]
        raise ExportError(f"layers {missing} have no attention; llama.cpp's {family} architecture needs attention "
                          f"in every block, and its deci architecture (the one with attention-less blocks) has "
                          f"no {_DECI_LACKS[family]}")
    if family == "phi3" and cfg.rotary_dim and cfg.rotary_dim != cfg.head_dim:
        raise ExportError(f"layers {[i for i, h in enumerate(heads) if not h]} have no attention, which llama.cpp "
                          f"holds in its deci architecture only, and deci rotates whole heads (src/models/deci.cpp "
                          f"asserts it), not the {cfg.rotary_dim} of {cfg.head_dim} dims partial_rotary_factor gives")
    if not heads[0]:
        raise ExportError("layer 0 has no attention; llama.cpp takes the head size from layer 0's head count "
                          "(src/llama-model.cpp), so a deci GGUF needs attention in its first layer")
    return Layout("deci", heads, kv, cfg.intermediate)


# What a family's block has that llama.cpp's deci block does not (why attention-less layers are refused).
_DECI_LACKS = {"qwen3": "q/k norm", "olmo2": "norms after the sublayers or q/k norm",
               "gemma3": "sandwich norms, q/k norm, GeGLU or sliding-window layers"}


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type one tensor is written in at --type `qtype` (see the module doc)."""
    if len(shape) == 1 or qtype == "f32":
        return "f32"
    if qtype == "f16" or shape[-1] % gguf_quants.BLOCK:
        return "f16"
    if qtype == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return qtype


_HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
               "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
               "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
               # Phi-3's fused matrices, kept fused: llama.cpp's phi3 reads attn_qkv (q rows, then k, then v)
               # and an ffn_up of 2 * n_ff rows (gate, then up) that it splits itself.
               "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
               # OLMo-2 and Gemma 3: the norms of each sublayer's output
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight"}


def gguf_name(hf_name: str, cfg: ModelConfig | None = None) -> str:
    """GGUF's name of a checkpoint tensor (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight).
    cfg: the model's config, needed for OLMo-2 and Gemma 3, whose post_attention_layernorm norms the
    attention's output (GGUF's post_attention_norm) rather than the MLP's input (ffn_norm)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".", 3)
    if parts[3] == "post_attention_layernorm.weight" and cfg is not None and (cfg.post_norm or cfg.sandwich_norm):
        return f"blk.{parts[2]}.post_attention_norm.weight"
    return f"blk.{parts[2]}.{_HF_TO_GGUF[parts[3]]}"


def llama_cpp_gemma3_attention_scale(cfg: ModelConfig, n_blocks: int) -> float:
    """The score scale llama.cpp's gemma3 applies to q (src/models/gemma3.cpp): it reads no
    query_pre_attn_scalar but takes 1/sqrt(head_dim), or 1/sqrt(hidden / heads) (integer division)
    for a 62-block model (its 27B). float32 as there."""
    from .checkpoint import torch_float32

    d = cfg.hidden // cfg.n_heads if n_blocks == 62 else cfg.head_dim
    return torch_float32(1.0 / math.sqrt(d))


def gemma3_q_norm_factor(cfg: ModelConfig, n_blocks: int) -> float:
    """What Gemma 3's q_norm weights (1 + w) are multiplied by in the GGUF so that llama.cpp's score
    scale times it is the model's query_pre_attn_scalar ** -0.5: q_norm's output feeds RoPE (linear)
    and then that scale, so the product is all that matters. 1 when the two scales agree."""
    want = cfg.attn_scale or cfg.head_dim ** -0.5
    return want / llama_cpp_gemma3_attention_scale(cfg, n_blocks)


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k (and their biases) from rotate-half order (transformers) to the pairwise order
    llama.cpp's llama/deci RoPE rotates: per head, rows (i, i + d/2) become rows (2i, 2i + 1)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of rope_permute: llama.cpp's pairwise row order back to rotate-half order."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3's per-frequency RoPE scaling as llama.cpp takes it: a rope_freqs.weight tensor of
    wavelength-dependent divisors (1 for short wavelengths, `factor` for long ones, smooth between)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old = cfg.rope_original_max_position
    low_wave, high_wave = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    out = []
    for f in inv_freq:
        wave = 2 * math.pi / f
        if wave < high_wave:
            out.append(1.0)
        elif wave > low_wave:
            out.append(cfg.rope_factor)
        else:
            s = (old / wave - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
            out.append(1.0 / ((1 - s) / cfg.rope_factor + s))
    return np.array(out, dtype=np.float32)


# ============================================================================ sources

def origin_gguf(model: Model) -> Path | None:
    """The GGUF file a checkpoint's weights were converted from, following shortrt.json sources."""
    m = model
    for _ in range(16):
        record = m.path / "source.json"
        if record.is_file():
            with contextlib.suppress(ValueError, OSError):
                p = Path(json.loads(record.read_text())["gguf"])
                return p if p.is_file() else None
        src = m.layer_map.source if m.is_pruned else None
        if src is None:
            return None
        if src == "default":
            return default_gguf_path()
        if src.lower().endswith(".gguf"):
            return Path(src) if Path(src).is_file() else None
        if not Path(src, "config.json").is_file():
            return None
        m = load(src)
    return None


def _check_type(qtype: str) -> None:
    if qtype not in TYPES:
        raise ExportError(f"unknown --type {qtype!r}: choose one of {', '.join(TYPES)}")


def _check_dst(dst: Path, overwrite: bool, sources: list[Path]) -> None:
    if dst.is_dir():
        raise ExportError(f"output {dst} is a directory; give a file name such as {dst / 'model.gguf'}")
    for s in sources:
        if dst.exists() and s.exists() and os.path.samefile(dst, s):
            raise ExportError(f"output {dst} is the GGUF being read; choose another file name")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--force on the command line) to replace it")


def _progress(items, show: bool, desc: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


# ============================================================================ checkpoint -> GGUF

def export_gguf(model, dst, *, qtype: str = "f16", overwrite: bool = False, progress: bool = False) -> Path:
    """Write checkpoint `model` ("default", a directory, a .gguf, a Model) as the GGUF file `dst`.

    qtype: f32, f16, q8_0, q4_0 (tensors encoded from the checkpoint's weights), or "source": the
    tensors of the GGUF the checkpoint was converted from, copied as stored (no dequantizing),
    for checkpoints whose weights are that file's (plain layers, not healed).
    """
    _check_type(qtype)
    m = load(model, progress=progress)
    cfg, lmap = m.model_config, m.layer_map
    layout = gguf_layout(cfg, lmap)
    origin = origin_gguf(m)
    dst = Path(dst).expanduser()
    _check_dst(dst, overwrite, [origin] if origin else [])
    if qtype == "source":
        return _export_from_source(m, origin, dst, layout, progress=progress)
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("writing GGUF needs the gguf package: pip install gguf") from None

    plan = []  # (gguf name, checkpoint name or None, numpy shape, type, rows of the checkpoint tensor or None)
    m.tensors  # noqa: B018 (validates the tensor set against config.json and shortrt.json)
    for name, shape in expected_tensors(cfg, lmap).items():
        for g, piece, rows in _pieces(name, tuple(shape), cfg, layout):
            plan.append((g, name, piece, tensor_type(g, piece, qtype), rows))
    if layout.arch == "olmo2" and cfg.tie_embeddings:  # llama.cpp's olmo2 requires output.weight
        shape = (cfg.vocab, cfg.hidden)
        plan.append(("output.weight", "model.embed_tokens.weight", shape, tensor_type("output.weight", shape, qtype),
                     None))
    if cfg.rope_type == "llama3":
        plan.append(("rope_freqs.weight", None, (cfg.head_dim // 2,), "f32", None))
    plan.sort(key=lambda p: _order(p[0]))
    with contextlib.ExitStack() as stack:
        # header first (it names every tensor), then one tensor at a time: memory stays one tensor
        tmp = stack.enter_context(staging_file(dst))
        writer = gguf.GGUFWriter(str(tmp), layout.arch)
        _add_model_keys(writer, m, cfg, layout, qtype)
        if not (origin and _tokenizer_from_gguf(writer, origin, cfg.vocab)):
            gguf_vocab.add_from_tokenizer_json(writer, m.path, cfg.vocab)
        for g, _, shape, t, _ in plan:
            writer.add_tensor_info(g, _stored_shape(shape, t), _np_dtype(t), _nbytes(shape, t),
                                   raw_dtype=_ggml_type(t))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for g, name, shape, t, rows in _progress(plan, progress, "export"):
            data = (llama3_rope_factors(cfg) if name is None
                    else _prepared(g, m.read_rows(name, *(rows or (0, None))), cfg, layout))
            writer.write_tensor_data(gguf_quants.encode(data, t))
        writer.close()
        os.replace(tmp, dst)
    return dst


def _pieces(name: str, shape: tuple[int, ...], cfg: ModelConfig, layout: Layout):
    """The GGUF tensors (name, shape, rows of the checkpoint tensor or None) one checkpoint tensor
    becomes: itself, or, for Phi-3's fused matrices in a deci file (whose blocks read separate
    q / k / v and gate / up matrices), its row blocks."""
    g = gguf_name(name, cfg)
    if layout.arch != "deci" or not cfg.fused_projections or not g.endswith((".attn_qkv.weight", ".ffn_up.weight")):
        return [(g, shape, None)]
    block = g.rsplit(".", 2)[0]
    if g.endswith(".attn_qkv.weight"):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        parts = (("attn_q", 0, q), ("attn_k", q, q + kv), ("attn_v", q + kv, q + 2 * kv))
    else:
        parts = (("ffn_gate", 0, cfg.intermediate), ("ffn_up", cfg.intermediate, 2 * cfg.intermediate))
    return [(f"{block}.{kind}.weight", (stop - start, shape[1]), (start, stop)) for kind, start, stop in parts]


def _order(name: str):
    m = _BLOCK.match(name)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, name)


def _prepared(g: str, tensor, cfg: ModelConfig, layout: Layout) -> np.ndarray:
    """A checkpoint tensor as GGUF stores it: float32, q/k rows permuted for pairwise RoPE (llama,
    deci); Gemma 3's norms as their factor 1 + w (llama.cpp multiplies by the stored weight, and its
    converter adds the 1), q_norm's times gemma3_q_norm_factor."""
    from .checkpoint import check_finite

    check_finite(g, tensor, "the checkpoint")
    x = tensor.float().numpy()
    if layout.arch in ("llama", "deci"):
        if g.endswith((".attn_q.weight", ".attn_q.bias")):
            x = rope_permute(x, cfg.n_heads)
        elif g.endswith((".attn_k.weight", ".attn_k.bias")):
            x = rope_permute(x, cfg.n_kv_heads)
    elif layout.arch == "gemma3" and g.endswith("norm.weight"):
        x = 1.0 + x  # in float32, as transformers' Gemma3RMSNorm computes it
        if g.endswith(".attn_q_norm.weight"):
            x = (x.astype(np.float64) * gemma3_q_norm_factor(cfg, len(layout.n_head))).astype(np.float32)
    return x


def _stored_shape(shape, t: str):
    """add_tensor_info's shape: elements for float types, bytes per row for block types."""
    return shape if t in ("f32", "f16") else (*shape[:-1], gguf_quants.row_bytes(t, shape[-1]))


def _np_dtype(t: str):
    return {"f32": np.float32, "f16": np.float16}.get(t, np.uint8)


def _nbytes(shape, t: str) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64)) * gguf_quants.row_bytes(t, shape[-1])


def _ggml_type(t: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[t]


def _add_model_keys(w, m: Model, cfg: ModelConfig, layout: Layout, qtype: str) -> None:
    from gguf import RopeScalingType

    w.add_type("model")
    w.add_name(m.path.name)
    w.add_block_count(len(layout.n_head))
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(layout.n_ff)
    w.add_head_count(list(layout.n_head) if layout.heterogeneous else layout.n_head[0])
    w.add_head_count_kv(list(layout.n_head_kv) if layout.heterogeneous else layout.n_head_kv[0])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim or cfg.head_dim)  # Phi-3's partial rotary: the leading dims
    w.add_rope_freq_base(cfg.rope_theta)
    if layout.arch == "gemma3":
        _add_gemma3_keys(w, m, cfg, len(layout.n_head))
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    w.add_file_type(FILE_TYPE[qtype])
    if qtype in ("q8_0", "q4_0"):
        w.add_quantization_version(2)  # GGML_QNT_VERSION
        w.add_quantized_by(f"shortrt export ({gguf_quants.encoder()})")
    w.add_string("shortrt.layer_map", json.dumps(m.layer_map.to_json()))


def _add_gemma3_keys(w, m: Model, cfg: ModelConfig, n_blocks: int) -> None:
    """Gemma 3's per-layer sliding/full choice, window, local RoPE base, logit soft-cap.

    llama.cpp reads attention.sliding_window_pattern either as a period (every n-th layer full) or
    as an array of one bool per block, true = sliding (load_swa_pattern in src/llama-model.cpp; the
    gguf package writes a list as that array): the array is written, so any pattern a pruning leaves
    runs as it is. With no sliding layer left no window is written (llama.cpp then builds no
    sliding-window cache). Sliding layers take rope.freq_base_swa and no RoPE scaling (llama.cpp's
    rope_freq_scale_train_swa stays 1), full layers rope.freq_base and the scaling, as in transformers."""
    sliding = [cfg.is_sliding(i) for i in range(n_blocks)]
    if any(sliding):
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern(sliding)
        w.add_rope_freq_base_swa(cfg.rope_local_theta)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    # Not a llama.cpp key: what gemma3_q_norm_factor folded into q_norm, for reading the file back.
    scalar = json.loads((m.path / "config.json").read_text()).get("query_pre_attn_scalar") or 256
    w.add_float32("shortrt.query_pre_attn_scalar", float(scalar))


def _tokenizer_from_gguf(writer, origin: Path, vocab: int) -> bool:
    from gguf import GGUFReader

    return gguf_vocab.add_from_gguf(writer, GGUFReader(str(origin)), vocab)


# ============================================================================ GGUF -> checkpoint

# GGUF architectures read as sources, and whether their q/k rows are stored in llama.cpp's pairwise
# RoPE order (llama.cpp's converter permutes them for `llama` only; Qwen2/Qwen3 use NEOX RoPE there).
SOURCE_ARCHS = {"llama": True, "qwen2": False, "qwen3": False, "olmo2": False, "phi3": False, "gemma3": False}
# Architectures whose config.json is built here from the GGUF's keys (transformers' GGUF config reader has
# no olmo2, and drops Phi-3's partial rotary and Gemma 3's layer pattern, local RoPE base and soft-cap).
_OWN_CONFIG = {"olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _int_if_whole(x: float):
    """transformers' Gemma 3 config takes query_pre_attn_scalar as an int."""
    return int(x) if float(x).is_integer() else float(x)


def _config_from_gguf(reader, arch: str, tensor_names: set[str]) -> dict:
    """config.json of an olmo2 / phi3 / gemma3 GGUF, from the keys export writes (and llama.cpp reads)."""
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.") and k != "tokenizer.ggml.tokens"
         and k != "tokenizer.ggml.merges" and k != "tokenizer.ggml.token_type"}

    def key(name, default=None):
        v = f.get(f"{arch}.{name}", default)
        if v is None:
            raise ShortrtError(f"GGUF key {arch}.{name} is missing")
        return v

    hidden, heads = int(key("embedding_length")), key("attention.head_count")
    kv = key("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv, list):
        raise ShortrtError(f"per-layer head counts in a {arch} GGUF cannot be read")
    head_dim = int(key("attention.key_length", hidden // heads))
    c = {"architectures": [_OWN_CONFIG[arch]], "model_type": "gemma3_text" if arch == "gemma3" else arch,
         "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
         "num_hidden_layers": int(key("block_count")), "num_attention_heads": int(heads),
         "num_key_value_heads": int(kv), "max_position_embeddings": int(key("context_length")),
         "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
         "vocab_size": int(f.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)),
         "rope_theta": float(key("rope.freq_base", 10000.0)), "tie_word_embeddings": "output.weight" not in tensor_names,
         "dtype": "float32"}
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in f:
            c[{"padding": "pad"}.get(name, name) + "_token_id"] = int(f[f"tokenizer.ggml.{name}_token_id"])
    if f.get(f"{arch}.rope.scaling.type") == "linear":
        c["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    rotary = int(key("rope.dimension_count", head_dim))
    if arch == "phi3" and rotary != head_dim:
        c["partial_rotary_factor"] = rotary / head_dim
    if arch == "gemma3":
        n = c["num_hidden_layers"]
        window = int(f.get(f"{arch}.attention.sliding_window") or 0)
        pattern = f.get(f"{arch}.attention.sliding_window_pattern", 6)
        if not window:
            sliding = [False] * n
        elif isinstance(pattern, list):
            sliding = [bool(x) for x in pattern]
        else:  # llama.cpp's set_swa_pattern: the last of every `pattern` layers full
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n)]
        from .checkpoint import FULL, SLIDING

        c.update(head_dim=head_dim, layer_types=[SLIDING if x else FULL for x in sliding],
                 sliding_window=window or None, rope_local_base_freq=float(f.get(f"{arch}.rope.freq_base_swa", 10000.0)),
                 hidden_activation="gelu_pytorch_tanh",
                 final_logit_softcapping=float(f[f"{arch}.final_logit_softcapping"])
                 if f.get(f"{arch}.final_logit_softcapping") else None,
                 query_pre_attn_scalar=_int_if_whole(f.get("shortrt.query_pre_attn_scalar")
                                                     or (hidden // heads if n == 62 else head_dim)))
    return c


def gguf_to_checkpoint(gguf_path, out: Path, *, progress: bool = False) -> None:
    """Write the GGUF file's model into directory `out` (the caller's staging directory) as an fp32
    safetensors checkpoint: config.json and the tokenizer from the GGUF's metadata (transformers'
    GGUF config and tokenizer readers; no tensors), then every tensor read, dequantized to fp32 and
    written one piece of rows at a time, so peak memory is one piece (CHUNK_BYTES) plus one q/k
    matrix (whose rows are un-permuted whole), whatever the model's size. The values are those
    transformers' own GGUF loading gives (gguf's dequantize, the same q/k row order: tested)."""
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .checkpoint import CHUNK_BYTES, parse_config
    from .layermap import LayerMap
    from .safetensors_writer import TensorSource, write_sharded

    gguf_path = Path(gguf_path)
    arch = _gguf_architecture(gguf_path)
    if arch not in SOURCE_ARCHS:
        raise ShortrtError(f"{gguf_path.name}: GGUF architecture {arch!r} cannot be read "
                           f"(shortrt reads {', '.join(SOURCE_ARCHS)})")
    if arch in _OWN_CONFIG:
        from transformers import PreTrainedTokenizerFast

        reader = GGUFReader(gguf_path)
        doc = _config_from_gguf(reader, arch, {t.name for t in reader.tensors})
        (out / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        gen = {k: doc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in doc}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        # the tokenizer.* keys alone (transformers' AutoTokenizer would first read the config, refusing olmo2)
        PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    else:
        # The config and tokenizer first: transformers' readers parse every field (the vocabulary too)
        # and are freed before ours is opened for the tensors.
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.dtype = torch.float32
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
        reader = GGUFReader(gguf_path)
        # transformers' GGUF config reader takes the head size as hidden / heads; Qwen3's is its own
        # (attention.key_length, which llama.cpp reads too).
        field = reader.fields.get(f"{arch}.attention.key_length")
        if field is not None:
            doc, head_dim = json.loads((out / "config.json").read_text()), int(field.contents())
            if doc.get("head_dim", doc["hidden_size"] // doc["num_attention_heads"]) != head_dim:
                doc["head_dim"] = head_dim
                (out / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    cfg = parse_config(json.loads((out / "config.json").read_text()))
    by_gguf = {gguf_name(n, cfg): (n, shape) for n, shape in expected_tensors(cfg, LayerMap.dense(cfg.n_layers)).items()}
    q_norm_factor = gemma3_q_norm_factor(cfg, cfg.n_layers) if arch == "gemma3" else 1.0
    stored = {t.name: t for t in reader.tensors}
    missing = sorted(set(by_gguf) - set(stored))
    extra = sorted(set(stored) - set(by_gguf) - {"rope_freqs.weight"})  # llama3 rope factors: in the config
    if missing or extra:
        raise ShortrtError(f"{gguf_path.name}: its tensors do not match its metadata (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")

    total = sum(4 * math.prod(shape) for _, shape in by_gguf.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {gguf_path.name}")

    def pieces(t, hf_name: str, shape):
        rows = shape[0] if len(shape) > 1 else 1
        width = math.prod(shape) // rows
        data = t.data.reshape(rows, -1) if len(shape) > 1 else t.data.reshape(1, -1)
        unpermute = SOURCE_ARCHS[arch] and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                             "k_proj.bias"))
        # A quarter of CHUNK_BYTES of fp32 per piece: gguf's dequantize holds a few temporaries of
        # the output's size while it runs.
        step = rows if unpermute else max(1, CHUNK_BYTES // (16 * width))
        row_bytes = t.n_bytes // rows
        for start in range(0, rows, step):
            x = np.asarray(dequantize(data[start:start + step], t.tensor_type), dtype=np.float32)
            _drop_pages(reader.data, t.data_offset + start * row_bytes, min(step, rows - start) * row_bytes)
            if unpermute:
                heads = cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads
                x = rope_unpermute(x.reshape(shape), heads)
            if arch == "gemma3" and t.name.endswith("norm.weight"):  # back from the stored factor 1 + w
                if t.name.endswith(".attn_q_norm.weight"):
                    x = (x.astype(np.float64) / q_norm_factor).astype(np.float32)
                x = x - np.float32(1.0)
            if not np.isfinite(x).all():
                raise ShortrtError(f"{gguf_path.name}: tensor {t.name} has non-finite values")
            if bar is not None:
                bar.update(x.nbytes)
            yield memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))

    sources = []
    for g, (hf_name, shape) in sorted(by_gguf.items(), key=lambda kv: _order(kv[0])):
        t = stored[g]
        if tuple(int(d) for d in reversed(t.shape)) != tuple(shape):
            raise ShortrtError(f"{gguf_path.name}: tensor {g} has shape {list(reversed(t.shape.tolist()))}, "
                               f"its metadata says {list(shape)}")
        sources.append(TensorSource(hf_name, "F32", list(shape), lambda t=t, n=hf_name, s=shape: pieces(t, n, s)))
    try:
        write_sharded(out, sources, max_shard_bytes=4 << 30, metadata={"format": "pt"})
    finally:
        if bar is not None:
            bar.close()


def _gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file, read from its header without parsing the other fields
    (GGUF v2/v3: magic, version, tensor count, field count, then key/value pairs; the architecture
    is the first key writers put there -- else the whole reader is used)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        if head[:4] != b"GGUF":
            raise ShortrtError(f"{path}: not a GGUF file (its first bytes are {head[:4]!r})")
        pos = 24
        (klen,) = struct.unpack_from("<Q", head, pos)
        key = head[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", head, pos)
        if key == "general.architecture" and vtype == 8:  # a string
            (vlen,) = struct.unpack_from("<Q", head, pos + 4)
            return head[pos + 12:pos + 12 + vlen].decode()
    except (struct.error, UnicodeDecodeError):
        raise ShortrtError(f"{path}: truncated or damaged GGUF header") from None
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field else "?"


def _drop_pages(mapped, offset: int, length: int) -> None:
    """Tell the kernel the file pages [offset, offset + length) of a memory-mapped GGUF are done
    with, so they leave this process's resident set (they stay in the page cache): without it
    reading a model maps every page of the file in, and the resident set grows to the file's size."""
    import mmap

    m = getattr(mapped, "_mmap", None)
    if m is None or not hasattr(m, "madvise") or length <= 0:
        return
    page = mmap.PAGESIZE
    start = offset // page * page
    stop = min(len(m), -(-(offset + length) // page) * page)
    with contextlib.suppress(OSError, ValueError):
        m.madvise(mmap.MADV_DONTNEED, start, stop - start)


# ============================================================================ GGUF -> pruned GGUF

def _export_from_source(m: Model, origin: Path | None, dst: Path, layout: Layout, *, progress: bool) -> Path:
    lmap = m.layer_map
    if origin is None:
        raise ExportError(f"--type source copies the tensors of the GGUF a checkpoint was converted from, and "
                          f"{m.path} was not converted from one; choose f32, f16, q8_0 or q4_0")
    odd = sorted({e.kind for e in lmap.layers} - {"layer"})
    if odd or lmap.healing is not None:
        what = f"trained {', '.join(odd)} entries" if odd else "healed weights"
        raise ExportError(f"{m.path} has {what}, which {origin.name} does not hold; choose f32, f16, q8_0 or q4_0")
    from gguf import GGUFReader

    reader = GGUFReader(str(origin))
    _check_same_weights(m, reader, origin, layout)
    blocks = [(e.source, e.attention) for e in lmap.layers]
    return _write_pruned(reader, origin, blocks, dst, layout, progress=progress,
                         extra={"shortrt.layer_map": json.dumps(lmap.to_json())})


def _check_same_weights(m: Model, reader, origin: Path, layout: Layout) -> None:
    """The checkpoint's final norm, as export would store it (Gemma 3's as 1 + w), must be the GGUF's
    output_norm (a cheap proof they are one model)."""
    mine = _prepared("output_norm.weight", m.read_tensors(["model.norm.weight"])["model.norm.weight"],
                     m.model_config, layout)
    theirs = next((t for t in reader.tensors if t.name == "output_norm.weight"), None)
    if theirs is None or theirs.tensor_type.name not in ("F32", "F16") or \
            not np.array_equal(np.asarray(theirs.data, dtype=np.float32).reshape(mine.shape), mine):
        raise ExportError(f"{m.path}'s weights are not those of {origin} (output_norm differs); "
                          "choose f32, f16, q8_0 or q4_0")


def prune_gguf(src, retained: list[int], dst, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Write `dst`: GGUF `src` with only the blocks in `retained` (original indices, in order),
    renumbered 0..k-1, tensors copied as stored."""
    from gguf import GGUFReader

    src, dst = Path(src), Path(dst)
    _check_dst(dst, overwrite, [src])
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    if not retained:
        raise ValueError("retained is empty: at least one block must remain")
    bad = [i for i in retained if not 0 <= i < n_blocks]
    if bad:
        raise ValueError(f"block indices {bad} out of range for {src.name} ({n_blocks} blocks)")
    if len(set(retained)) != len(retained):
        raise ValueError(f"retained has duplicate blocks: {retained}")
    return _write_pruned(reader, src, [(i, True) for i in retained], dst, None, progress=progress)


def _write_pruned(reader, src: Path, blocks: list[tuple[int, bool]], dst: Path, layout: Layout | None, *,
                  progress: bool, extra: dict | None = None) -> Path:
    """Copy `reader`'s keys and tensors, keeping blocks (original index, keeps attention) in order."""
    from gguf import GGUFValueType, GGUFWriter

    arch = reader.fields["general.architecture"].contents()
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    if layout is not None and layout.arch not in (arch, "deci"):
        raise ExportError(f"{src.name} is a {arch} GGUF but the checkpoint exports as {layout.arch}")
    new_arch = layout.arch if layout is not None else arch
    if new_arch == "deci" and arch != "llama":
        raise ExportError(f"{src.name} is a {arch} GGUF; its blocks can go to deci only from llama "
                          "(choose f32, f16, q8_0 or q4_0 to re-encode)")
    keep = {old: (new, attention) for new, (old, attention) in enumerate(blocks)}
    per_layer = {f"{arch}.{k}" for k in _PER_LAYER_KEYS}
    with staging_file(dst) as tmp:
        w = GGUFWriter(str(tmp), new_arch)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            vtype = field.types[0]
            value = field.contents()
            if name == f"{arch}.block_count":
                value = len(blocks)
            elif name in per_layer and vtype == GGUFValueType.ARRAY and len(value) == n_blocks:
                value = [value[old] for old, _ in blocks]
            if new_arch == "deci" and name in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
                counts = layout.n_head if name.endswith(".head_count") else layout.n_head_kv
                value, vtype = [int(c) for c in counts], GGUFValueType.ARRAY
            if name.startswith(f"{arch}."):
                name = f"{new_arch}.{name[len(arch) + 1:]}"
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None  # a scalar count's type stays
            w.add_key_value(name, value, vtype, sub_type=sub)
        for key, value in (extra or {}).items():
            w.add_string(key, value)
        for t in _progress(reader.tensors, progress, "export"):
            m = _BLOCK.match(t.name)
            name = t.name
            if m:
                old = int(m.group(1))
                if old not in keep:
                    continue
                new, attention = keep[old]
                if not attention and m.group(2).startswith(_ATTENTION_TENSORS):
                    continue
                name = f"blk.{new}.{m.group(2)}"
            # t.data is in numpy order: elements for float types, bytes per row for block types
            w.add_tensor(name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
    return dst


def describe(path) -> str:
    """A few lines about a GGUF file: architecture, blocks, attention, tensor types, size, quantizer."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    n = int(r.fields[f"{arch}.block_count"].contents())
    heads = r.fields[f"{arch}.attention.head_count"].contents()
    with_attention = sum(1 for h in heads if h) if isinstance(heads, list) else n
    types = Counter(t.tensor_type.name for t in r.tensors)
    by = r.fields.get("general.quantized_by")
    lines = [f"architecture {arch}", f"blocks       {n}, {with_attention} with attention",
             f"tensors      {', '.join(f'{c} {k}' for k, c in sorted(types.items()))}",
             f"written to   {path} ({Path(path).stat().st_size / 2**20:.1f} MiB)"]
    if by is not None:
        lines.append(f"quantized by {by.contents()}")
    return "\n".join(lines)


__all__ = ["export_gguf", "prune_gguf", "gguf_layout", "Layout", "ExportError", "tensor_type", "gguf_name",
           "rope_permute", "origin_gguf", "TYPES", "describe", "gemma3_q_norm_factor"]
