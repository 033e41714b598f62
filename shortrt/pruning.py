"""Write a pruned checkpoint: `prune(model, layer_map, out_dir)`.

The result is a standard checkpoint of the same architecture: the retained layers' tensors,
renumbered 0..k-1, `num_hidden_layers = k`, every per-layer config list trimmed to match, the
tokenizer and generation files copied, and shortrt.json recording the layer map and where it
came from. transformers builds each attention with `layer_idx` = its position in the new
model, so the KV cache lines up (no stale layer_idx from the dense model survives).

Tensors stream from the source safetensors one bounded piece at a time; shortrt.checkpoint.write_checkpoint
builds the checkpoint in a staging directory renamed into place only when complete, so there
is never a half-written checkpoint at out_dir.
"""
from __future__ import annotations

import dataclasses
import re

from .checkpoint import (MAX_SHARD_BYTES, Model, check_out_dir, gemma3_layer_types, load, sublayer_prefixes,
                         write_checkpoint)
from .layermap import LayerEntry, LayerMap
from .safetensors_writer import TensorSource

# Config lists that may happen to have num_hidden_layers items without being per-layer.
_NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids",
                  "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "id2label", "label2id"}


def prune(model, layer_map: LayerMap, out_dir, *, overwrite: bool = False, progress: bool = False,
          max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write the checkpoint `layer_map` describes to `out_dir` and return it as a shortrt Model.

    model: "default", a checkpoint directory, a .gguf file, or a Model. If the model is itself
    a pruned checkpoint, `layer_map` indexes its layers and the written shortrt.json is made
    relative to the original model.
    """
    src = load(model, runtime=False)  # calibrate/prune-only families (Mamba) too
    if not isinstance(layer_map, LayerMap):
        raise TypeError(f"layer_map must be a shortrt LayerMap, got {type(layer_map).__name__}")
    num_layers = src.model_config.n_layers
    if layer_map.source_num_layers != num_layers:
        raise ValueError(f"the layer map is for a model with {layer_map.source_num_layers} layers but "
                         f"{src} has {num_layers}")
    if not src.runtime_supported:  # Mamba: whole blocks only
        from .mamba import check_block_map

        check_block_map(layer_map)
    kinds = {e.kind for e in layer_map.layers} - {"layer"}
    if kinds:
        raise ValueError(f"prune writes plain layers only; this map has {sorted(kinds)} entries "
                         "(their trained weights come from shortrt.replace)")
    check_out_dir(out_dir, src.path, overwrite)
    if src.is_pruned:
        written = src.layer_map.then(layer_map)
    else:
        written = dataclasses.replace(layer_map, source=src.origin)
    tensors = layer_tensors(src, layer_map.layers)
    if progress:
        tensors = _with_progress(tensors)
    return write_checkpoint(out_dir, src, pruned_config(src.config(), layer_map.layers), written, tensors,
                            overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def layer_tensors(src: Model, layers: list[LayerEntry]) -> list[TensorSource]:
    """The tensors of a checkpoint whose layer i is `src`'s layer layers[i].source (its attention
    and MLP only where the entry keeps them): non-layer tensors, then each layer renamed. Each is
    copied in pieces of at most checkpoint.CHUNK_BYTES, so memory stays flat whatever the model's
    size. (`src.tensors` is already checked to be exactly what its config and layer map say.)
    A dropped sublayer takes its norm with it (checkpoint.sublayer_prefixes: OLMo-2's
    post_attention_layernorm goes with its attention)."""
    cfg = src.model_config  # a Mamba config has no sublayer norms (and its maps keep whole blocks)
    owners = sublayer_prefixes(getattr(cfg, "post_norm", False), getattr(cfg, "sandwich_norm", False))
    by_layer: dict[int, list[tuple[str, str]]] = {}
    plan: list[TensorSource] = []
    prefix = src.layer_prefix  # model.layers. (backbone.layers. in Mamba)
    layer_key = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    for name in sorted(src.tensors):
        m = layer_key.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append((name, m.group(2)))
        else:
            plan.append(_source(src, name, name))
    for new_index, entry in enumerate(layers):
        for name, rest in by_layer[entry.source]:
            if not entry.attention and rest.startswith(owners["attention"]):
                continue
            if not entry.mlp and rest.startswith(owners["mlp"]):
                continue
            plan.append(_source(src, name, f"{prefix}{new_index}.{rest}"))
    return plan


def _source(src: Model, name: str, new_name: str) -> TensorSource:
    _, dtype, shape = src.tensors[name]
    return TensorSource(new_name, dtype, list(shape), lambda: src.read_chunks(name))


def _with_progress(tensors: list[TensorSource]) -> list[TensorSource]:
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="prune")

    def wrap(t: TensorSource) -> TensorSource:
        def read():
            for piece in t.pieces():
                bar.update(len(piece))
                yield piece
        return TensorSource(t.name, t.dtype, t.shape, read)

    return [wrap(t) for t in tensors]


def pruned_config(config: dict, layers: list[LayerEntry]) -> dict:
    """config.json of a checkpoint whose layer i comes from layers[i].source: num_hidden_layers
    and every per-layer list of the source config (one item per layer) taken in that order."""
    num_layers = config["num_hidden_layers"]
    keep = [e.source for e in layers]
    if "Gemma3ForCausalLM" in (config.get("architectures") or ()) or config.get("model_type") == "gemma3_text":
        # Each kept layer keeps its attention type: a config that gives only sliding_window_pattern
        # is written out per layer (the pattern would re-derive the types from the new indices).
        config = {**config, "layer_types": gemma3_layer_types(config, num_layers)}
    out = dict(config)
    out["num_hidden_layers"] = len(keep)
    if "n_layer" in config:  # the older name some configs (Mamba's) also carry
        out["n_layer"] = len(keep)
    for key, value in config.items():
        if key in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != num_layers:
            continue
        out[key] = [value[i] for i in keep]
    return out
