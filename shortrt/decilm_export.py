"""Write a shortrt checkpoint as a DeciLM / nemotron-nas checkpoint (`shortrt export --to hf-heterogeneous`).

    export_hf_heterogeneous("out/smollm2-attn8", "smollm2-attn8-decilm")

This is the one module that writes that format. NVIDIA's heterogeneous Llama ("DeciLM", model_type
"nemotron-nas", architecture DeciLMForCausalLM) describes each block in `block_configs`:
`attention` is a no-op (no tensors, no KV cache) or grouped-query attention with
`n_heads_in_group` query heads per KV head; `ffn` is a no-op or a SwiGLU MLP whose width comes
from `ffn_mult` (`intermediate_size_from_ffn_mult`). Tensor names are Llama's, the absent
sub-blocks' tensors simply missing: exactly shortrt's layout, so tensors are copied as stored
(same names, dtype and bytes; q/k rows stay in rotate-half order, which vLLM's neox-style RoPE
for this model expects).

Read (nothing run here; no vLLM on these machines): vLLM's
vllm/model_executor/models/nemotron_nas.py at commit 00bd1493b3e8 (DeciLMDecoderLayer,
_ffn_mult_to_intermediate_size) and its NemotronNasModelArchConfigConvertor (KV heads of the
first block with attention); NVIDIA's block_config.py / configuration_decilm.py /
modeling_decilm.py as published with the Nemotron-NAS checkpoints (copies in the code index);
llama.cpp's DeciModel converter (conversion/deci.py, which indexes every block's
attention.n_heads_in_group, attention.replace_with_linear and ffn.ffn_mult, and wants the first
ffn_mult a JSON float). vLLM reads the blocks as attributes, so the config needs a class:
configuration_decilm.py (shortrt/decilm_configuration.py, shortrt's own) goes beside it and
config.json's auto_map names it (load with trust_remote_code=True).

Refused before anything is written, each with the reason:
- Qwen2 (q/k/v biases without an o_proj bias) and Qwen3 (q/k RMSNorm): DeciLM blocks are
  Llama's; use `--to gguf` (its deci architecture carries q/k/v biases);
- a Mistral sliding window shorter than the context (vLLM's nemotron_nas has no window);
- head_dim != hidden_size / num_attention_heads (NVIDIA's 2024 code and llama.cpp's converter
  derive the head size from those two);
- an MLP width that no ffn_mult gives (the format rounds up to a multiple of 256);
- a first layer without attention (vLLM starts the residual stream in block 0's attention);
- a layer that keeps attention but drops its MLP (llama.cpp's converter makes it a deci block
  with feed_forward_length 0, whose attention llama.cpp's deci graph skips);
- an existing non-empty output directory without overwrite, or the source itself.
shortrt has no linear replacement: `replace --kind mlp` trains a SwiGLU block, which is a plain
DeciLM ffn beside a no-op attention; `replace_with_linear` is always false.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import (_IGNORED_TENSOR, _NOT_COPIED, MAX_SHARD_BYTES, Model, ModelConfig, check_out_dir, load,
                         move_into_place, staging_dir)
from .errors import ShortrtError
from .layermap import LayerMap

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_MODULE = "configuration_decilm"
FFN_MULTIPLE = 256  # the format rounds every MLP width up to a multiple of this
_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM")


class HeterogeneousExportError(ShortrtError, ValueError):
    """The checkpoint cannot be written as a DeciLM / nemotron-nas checkpoint."""


# ============================================================================ the MLP width

def intermediate_size_from_ffn_mult(ffn_mult: float, hidden: int) -> int:
    """The MLP width a DeciLM reader builds for `ffn_mult`: int(2 * ffn_mult * hidden / 3), rounded
    up to a multiple of 256 (vLLM's and llama.cpp's _ffn_mult_to_intermediate_size)."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def _reproduces(ffn_mult: float, hidden: int, intermediate: int) -> bool:
    """True when every reader gets `intermediate`: in float64, after NVIDIA's block_config rounds
    ffn_mult to 6 decimals, and from a float32 parse (readers that keep it in f32) in f32 math."""
    import numpy as np

    f32 = np.float32(ffn_mult)
    f32_width = int(np.float32(2) * f32 * np.float32(hidden) / np.float32(3))
    return (intermediate_size_from_ffn_mult(ffn_mult, hidden) == intermediate
            and intermediate_size_from_ffn_mult(round(ffn_mult, 6), hidden) == intermediate
            and -(-f32_width // FFN_MULTIPLE) * FFN_MULTIPLE == intermediate)


def ffn_mult_for(intermediate: int, hidden: int) -> float:
    """An ffn_mult of at most 6 decimals that gives exactly `intermediate` (see _reproduces), or
    HeterogeneousExportError when none can: the format only expresses multiples of 256."""
    if intermediate % FFN_MULTIPLE:
        raise HeterogeneousExportError(
            f"intermediate_size {intermediate} cannot be written as a DeciLM ffn_mult: readers compute the MLP "
            f"width as int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of {FFN_MULTIPLE} (vLLM's "
            "_ffn_mult_to_intermediate_size), so only multiples of 256 are expressible")
    exact = 3 * intermediate / (2 * hidden)
    # the ratio itself where 6 decimals hold it (Llama 3 8B: 5.25), else the nearest 6-decimal value
    # (NVIDIA's block_config keeps 6), so a reader that forgot the round-up is off by at most 1
    for digits in range(6, -1, -1):
        candidate = round(exact, digits)
        if _reproduces(candidate, hidden, intermediate):
            return float(candidate)
    raise HeterogeneousExportError(  # not reached for multiples of 256 (tests/test_export_hf_heterogeneous.py)
        f"no ffn_mult with at most 6 decimals gives intermediate_size {intermediate} for hidden_size {hidden}")


# ============================================================================ config.json

def check_expressible(cfg: ModelConfig, lmap: LayerMap) -> None:
    """HeterogeneousExportError naming the first thing the format (or its readers) cannot hold."""
    if cfg.architecture == "Qwen2ForCausalLM":
        raise HeterogeneousExportError(
            "Qwen2ForCausalLM cannot be exported to hf-heterogeneous: DeciLM blocks have no q/k/v bias (their "
            "attention is Llama's, with one attention_bias switch for q, k, v and o alike, and Qwen2 has biases "
            "on q/k/v only); use --to gguf, whose deci architecture carries q/k/v biases")
    if cfg.architecture == "Qwen3ForCausalLM":
        raise HeterogeneousExportError(
            "Qwen3ForCausalLM cannot be exported to hf-heterogeneous: DeciLM blocks have no q/k RMSNorm "
            "(their attention is Llama's)")
    if cfg.architecture not in _FAMILIES:
        raise HeterogeneousExportError(f"{cfg.architecture} cannot be exported to hf-heterogeneous "
                                       f"(DeciLM blocks are Llama's; export writes {', '.join(_FAMILIES)})")
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position:
        raise HeterogeneousExportError(
            f"a sliding window of {cfg.sliding_window} tokens (< the {cfg.max_position}-token context) cannot be "
            "exported to hf-heterogeneous: vLLM's nemotron_nas attends over the whole context")
    if cfg.head_dim * cfg.n_heads != cfg.hidden:
        raise HeterogeneousExportError(
            f"head_dim {cfg.head_dim} is not hidden_size / num_attention_heads = {cfg.hidden}/{cfg.n_heads}; "
            "NVIDIA's DeciLM code and llama.cpp's DeciLM converter derive the head size from those two")
    if not lmap.layers[0].attention:
        raise HeterogeneousExportError(
            "layer 0 has no attention; vLLM's nemotron_nas starts the residual stream in the first block's "
            "attention (its fused post_attention_layernorm would get no residual), so a DeciLM checkpoint "
            "needs attention in block 0")
    no_mlp = [i for i, e in enumerate(lmap.layers) if e.attention and not e.mlp]
    if no_mlp:
        raise HeterogeneousExportError(
            f"layers {no_mlp} keep attention but have no MLP; llama.cpp's DeciLM converter (convert_hf_to_gguf "
            "DeciModel) writes such a block with feed_forward_length 0, whose attention llama.cpp's deci graph "
            "skips, so the checkpoint would not run the same model everywhere")
    ffn_mult_for(cfg.intermediate, cfg.hidden)


def block_configs(cfg: ModelConfig, lmap: LayerMap) -> list[dict]:
    """One block_configs entry per checkpoint layer, every field NVIDIA's BlockConfig has (the
    neutral value where shortrt has nothing to say), so each reader finds the keys it indexes."""
    ffn_mult = ffn_mult_for(cfg.intermediate, cfg.hidden)
    out = []
    for e in lmap.layers:
        attention = {"no_op": not e.attention, "replace_with_linear": False, "sparsify": None,
                     "n_heads_in_group": cfg.n_heads // cfg.n_kv_heads if e.attention else None,
                     "window_length": None, "num_sink_tokens": None,
                     "use_prefill_window_in_sink_attention": False, "unshifted_sink": False}
        ffn = {"no_op": not e.mlp, "replace_with_linear": False, "sparsify": None,
               "ffn_mult": ffn_mult if e.mlp else None}
        out.append({"attention": attention, "ffn": ffn})
    return out


def _rope_fields(cfg: ModelConfig) -> dict:
    """rope_theta and rope_scaling in the (transformers 4) form NVIDIA's configs and vLLM read."""
    out: dict = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if cfg.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_position}
        # llama.cpp's DeciLM converter reads this one at the top level (default 8192)
        out["original_max_position_embeddings"] = cfg.rope_original_max_position
    return out


def decilm_config(m: Model) -> dict:
    """config.json of the export of `m` (HeterogeneousExportError when it cannot be one)."""
    cfg, lmap = m.model_config, m.layer_map
    check_expressible(cfg, lmap)
    src = m.config()
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
           "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"},
           "hidden_size": cfg.hidden, "num_hidden_layers": len(lmap.layers),
           "num_attention_heads": cfg.n_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab,
           # what every block with attention / an MLP has (block_configs is the per-block truth)
           "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate,
           "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.rms_eps,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "tie_word_embeddings": cfg.tie_embeddings, **_rope_fields(cfg)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "initializer_range"):
        if src.get(key) is not None:
            out[key] = src[key]
    out["block_configs"] = block_configs(cfg, lmap)
    return out


# ============================================================================ writing

def export_hf_heterogeneous(model, out, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Write checkpoint `model` ("default", a directory, a .gguf, a Model) as the DeciLM /
    nemotron-nas checkpoint directory `out`: config.json, configuration_decilm.py, the tensors
    as stored, the tokenizer and chat template. Atomic: nothing appears at `out` until complete."""
    from .pruning import _with_progress
    from .safetensors_writer import TensorSource, write_sharded

    m = load(model, progress=progress)
    config = decilm_config(m)
    out = check_out_dir(out, m.path, overwrite)
    cfg = m.model_config
    tensors = []
    for name, (_, dtype, shape) in sorted(m.tensors.items(), key=lambda kv: _order(kv[0])):
        if _IGNORED_TENSOR.search(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        tensors.append(TensorSource(name, dtype, list(shape), lambda n=name: m.read_chunks(n)))
    if progress:
        tensors = _with_progress(tensors)
    with staging_dir(out) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes=MAX_SHARD_BYTES, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(Path(__file__).with_name("decilm_configuration.py"), tmp / f"{CONFIG_MODULE}.py")
        for f in sorted(m.path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _NOT_COPIED.search(f.name):
                shutil.copy2(f, tmp / f.name)
        record = {"format": "shortrt.export/1", "to": "hf-heterogeneous", "from": str(m.path.resolve()),
                  "layer_map": m.layer_map.to_json()}
        (tmp / "shortrt_export.json").write_text(json.dumps(record, indent=2) + "\n")
        move_into_place(tmp, out)
    return out


def _order(name: str):
    parts = name.split(".")
    if name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
        return (1, int(parts[2]), name)
    return (0, 0, name)


def describe(out) -> str:
    """A few lines about an export: blocks, which have attention / an MLP, the MLP width, size."""
    out = Path(out)
    c = json.loads((out / "config.json").read_text())
    blocks = c["block_configs"]
    with_attention = sum(1 for b in blocks if not b["attention"]["no_op"])
    with_mlp = [b["ffn"]["ffn_mult"] for b in blocks if not b["ffn"]["no_op"]]
    width = intermediate_size_from_ffn_mult(with_mlp[0], c["hidden_size"]) if with_mlp else 0
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return "\n".join([f"architecture {c['architectures'][0]} (model_type {c['model_type']})",
                      f"blocks       {len(blocks)}, {with_attention} with attention, {len(with_mlp)} with an MLP"
                      + (f" (ffn_mult {with_mlp[0]} -> {width})" if with_mlp else ""),
                      f"written to   {out} ({size / 2**20:.1f} MiB of tensors; load with trust_remote_code=True)"])


__all__ = ["export_hf_heterogeneous", "decilm_config", "block_configs", "check_expressible", "ffn_mult_for",
           "intermediate_size_from_ffn_mult", "HeterogeneousExportError", "describe", "ARCHITECTURE", "MODEL_TYPE"]
