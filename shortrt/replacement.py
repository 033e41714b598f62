"""Replace a removed span of layers with one trained module: `replace(model, layer_map, out_dir)`.

LLM-Streamline (Chen et al. 2024): `select(scores, remove=n, method="span")` picks the contiguous
span whose input and output are most alike; instead of dropping it, one module is trained on
calibration text to map the span's input to its output (shortrt.replace_training), and the
checkpoint keeps the retained layers with that module at the span's position:

- kind="layer": a full decoder layer, entry kind "layer_replacement". The checkpoint stays a
  standard checkpoint of its family (transformers loads it and generates with its KV cache).
  Gemma 3: the layer keeps the attention type (sliding_attention or full_attention) of the span
  layer it started from, written to config.json's layer_types and shortrt.json's "layer_type".
- kind="mlp":   an attention-less layer (post_attention_layernorm + mlp only), entry kind
  "mlp_replacement", no KV slot; shortrt's runtime, reference model and evaluate run it.

shortrt.json records the replacement: kind, span, the layer it started from, the training data
and token count, steps, learning rate, final training loss, and the held-out loss of the trained
module, of its initial weights and of plain removal (the identity).

Defaults, chosen on SmolLM2-135M with 8 layers replaced on 2 CPU cores (numbers in
benchmarks/results/replace/summary.md): 32768 tokens in 64 sequences of 512 (8 held out), at
most 300 Adam steps of 4 sequences at a peak rate of 4e-3. Capturing the states is one forward
pass through the layers up to the span's end (about 1 min unloaded for layers 0-18); a step
takes about 0.3 s for the MLP and 0.9 s for the layer, so training takes about 2 and 5 min.
64k tokens gave almost the same perplexity at 300 steps, while 300 steps beat 150 clearly.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Model, cache_dir, check_out_dir, load, write_checkpoint
from .errors import CheckpointError, ShortrtError
from .layermap import LayerEntry, LayerMap
from .replace_training import (DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, KINDS, MLPBlock,  # noqa: F401 (re-exported)
                                TrainResult, train_replacement)

DEFAULT_TOKENS = 32768
DEFAULT_SEQ_LEN = 512


def span_of(layer_map: LayerMap) -> list[int]:
    """The one contiguous span of original layers `layer_map` removes (clear errors otherwise)."""
    if not isinstance(layer_map, LayerMap):
        raise TypeError(f"layer_map must be a shortrt LayerMap, got {type(layer_map).__name__}")
    odd = sorted({e.kind for e in layer_map.layers} - {"layer"})
    if odd:
        raise ShortrtError(f"the layer map already has {odd} entries; replace needs a map of plain layers "
                           "from select(scores, remove=N, method='span')")
    if any(not e.attention or not e.mlp for e in layer_map.layers):
        raise ShortrtError("a replacement cannot be combined with attention or MLP sublayer pruning "
                           "(this layer map drops sublayers); use select(..., method='span')")
    removed = sorted(layer_map.removed)
    if not removed:
        raise ShortrtError("the layer map removes no layers: there is no span to replace")
    if removed != list(range(removed[0], removed[-1] + 1)):
        raise ShortrtError(f"a replacement needs one contiguous removed span (select(..., method='span')); "
                           f"this layer map removes {removed}")
    expected = [i for i in range(layer_map.source_num_layers) if i not in set(removed)]
    if [e.source for e in layer_map.layers] != expected:
        raise ShortrtError("the layer map must keep every other layer in its original order; "
                           f"it keeps {[e.source for e in layer_map.layers]}")
    return removed


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def replace(model, layer_map: LayerMap, out_dir, *, kind: str = "layer", texts=None,
            n_tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN, steps: int = DEFAULT_STEPS,
            lr: float = DEFAULT_LR, batch: int = DEFAULT_BATCH, cosine_weight: float = 0.0, seed: int = 0,
            stream: bool | None = None, device: str = "cpu", overwrite: bool = False, progress: bool = True):
    """Train a replacement for the span `layer_map` removes and write the checkpoint to `out_dir`.

    model: "default", a dense checkpoint directory, a .gguf file, or a Model.
    layer_map: from select(scores, remove=n, method="span"): one contiguous removed span.
    kind: "layer" (one decoder layer; a standard checkpoint) or "mlp" (an attention-less block: one
    layer's MLP with the norm(s) its family puts around it). texts: calibration text (None = the packaged Austen
    chapters; a .txt/.jsonl path or a list of strings). n_tokens, seq_len: calibration tokens and
    tokens per sequence. steps, lr, batch: most Adam steps, peak learning rate, sequences per step.
    cosine_weight: weight of a (1 - cos) term added to the MSE loss. device: "cpu", "cuda" or
    "cuda:N" (checked before anything is loaded): on a GPU the frozen model runs in bf16 and the
    replacement trains there in fp32. stream: capture the span's states one decoder layer at a
    time with only its weights in memory (shortrt.streaming); None (default) streams when the
    model's fp32 weights would take more than a quarter of the available memory, as calibrate does.
    Returns the written Model.
    """
    from . import data
    from .devices import resolve_device, work_dtype

    dev = resolve_device(device)

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    for name, value in (("n_tokens", n_tokens), ("seq_len", seq_len), ("steps", steps), ("batch", batch)):
        _check_positive(name, value)
    src = load(model)
    config = src.config()
    num_layers = src.model_config.n_layers
    span = span_of(layer_map)
    if layer_map.source_num_layers != num_layers:
        raise ValueError(f"the layer map is for a model with {layer_map.source_num_layers} layers but "
                         f"{src} has {num_layers}")
    if not src.layer_map.is_dense:
        raise ShortrtError(f"{src} is already pruned ({src.layer_map.method!r}); train a replacement on the dense "
                           "model it came from")
    max_positions = src.model_config.max_position
    if seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    out = check_out_dir(out_dir, src.path, overwrite)  # before minutes of training, not after

    texts, description = data.calibration_texts("default" if texts is None else texts)
    batches, used_tokens = data.training_batches(src.tokenizer(), texts, n_tokens, seq_len, batch)
    from .calibration import should_stream
    from .streaming import LayerStream

    if stream is None:
        stream = should_stream(src)
    hf = LayerStream(src, work_dtype(dev), device=dev) if stream else src.load_hf(work_dtype(dev)).to(dev)
    result = train_replacement(hf, span, [b.to(dev) for b in batches], kind=kind, steps=steps, lr=lr, batch=batch,
                               cosine_weight=cosine_weight, seed=seed, progress=progress)
    del hf
    record = replacement_record(result, span, kind=kind, lr=lr, batch=batch, cosine_weight=cosine_weight,
                                seed=seed, max_steps=steps, device=dev.type, streamed=bool(stream),
                                data={"source": description, "n_tokens": used_tokens, "seq_len": seq_len,
                                      "n_sequences": result.n_train + result.n_heldout})
    if kind == "layer" and src.model_config.layer_types:
        # Gemma 3: the trained layer is a copy of init_layer and attends as it did (its window and RoPE
        # base); the written config's layer_types gives it that type (pruned_config keeps init_layer's).
        record["layer_type"] = src.model_config.layer_types[result.init_layer]
    return _write_checkpoint(src, config, layer_map, span, result, record, out, overwrite)


def replacement_record(result: TrainResult, span: list[int], *, kind: str, lr: float, batch: int,
                       cosine_weight: float, seed: int, max_steps: int, data: dict, device: str = "cpu",
                       streamed: bool = False) -> dict:
    """The "replacement" object of shortrt.json."""
    return {
        "kind": kind,
        "span": list(span),
        "init_layer": result.init_layer,
        "parameters": sum(p.numel() for p in result.module.parameters()),
        "loss": "mse" + (f" + {cosine_weight:g} * (1 - cos)" if cosine_weight else ""),
        "data": {**data, "train_sequences": result.n_train, "heldout_sequences": result.n_heldout},
        "steps": result.steps,
        "max_steps": max_steps,
        "best_step": result.best_step,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "heldout_loss_at_init": result.heldout_loss_at_init,
        "heldout_loss_identity": result.heldout_loss_identity,
        "init_candidates": {str(k): v for k, v in result.init_candidates.items()},
        "history": [[step, train, held] for step, train, held in result.history],
        "seconds": {"capture": round(result.capture_seconds, 2), "train": round(result.train_seconds, 2)},
        "device": device,
        "streamed": streamed,
    }


def _write_checkpoint(src: Model, config: dict, layer_map: LayerMap, span: list[int], result: TrainResult,
                      record: dict, out: Path, overwrite: bool) -> Model:
    """The retained layers' tensors, the trained module's at the span's position, config and shortrt.json."""
    from .pruning import layer_tensors, pruned_config
    from .safetensors_writer import TensorSource, tensor_bytes

    kind = record["kind"]
    position = sum(1 for e in layer_map.layers if e.source < span[0])
    before, after = layer_map.layers[:position], layer_map.layers[position:]
    # The layers as stored: the init layer where the span was (without its attention for
    # kind="mlp") gives every tensor name, dtype, shape and per-layer config value; its
    # tensors are then swapped for the trained ones.
    stored = ([LayerEntry(e.source) for e in before] + [LayerEntry(result.init_layer, attention=kind == "layer")]
              + [LayerEntry(e.source) for e in after])
    written = LayerMap(layer_map.source_num_layers,
                       [LayerEntry(e.source) for e in before]
                       + [LayerEntry(list(span), kind=f"{kind}_replacement", attention=kind == "layer", mlp=True)]
                       + [LayerEntry(e.source) for e in after],
                       layer_map.method, [], scores=layer_map.scores, calibration=layer_map.calibration,
                       replacement=record, source=src.origin)
    prefix = f"model.layers.{position}."
    trained = {prefix + name: t.cpu() for name, t in result.module.state_dict().items()}

    plan = layer_tensors(src, stored)
    slot = [t.name for t in plan if t.name.startswith(prefix)]
    if sorted(slot) != sorted(trained):
        raise ShortrtError(f"the trained module's tensors {sorted(trained)} do not match the layer's "
                           f"tensors in {src.path}: {sorted(slot)}")
    tensors = []
    for t in plan:
        if t.name in trained:
            value = trained[t.name]
            if list(value.shape) != list(t.shape):
                raise ShortrtError(f"trained tensor {t.name} has shape {list(value.shape)}, "
                                   f"the checkpoint's has {t.shape}")
            t = TensorSource(t.name, t.dtype, t.shape, lambda v=value, d=t.dtype: tensor_bytes(v, d))
        tensors.append(t)
    return write_checkpoint(out, src, pruned_config(config, stored), written, tensors, overwrite=overwrite)


def replaced_checkpoint(model, scores, k: int, kind: str, **kw):
    """The span+`kind` checkpoint with `k` layers replaced, made once and cached.

    It lives in $SHORTRT_CACHE/bench/<model dir name>/span+<kind>-p<k> (where
    benchmarks/latency.py looks) and is rebuilt only when its recorded span, kind or training
    text differ from what `select(scores, remove=k, method="span")` and kw give now. kw go to
    replace().
    """
    from .selection import select

    src = load(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    lmap = select(scores, remove=k, method="span")
    out = cache_dir() / "bench" / src.path.name / f"span+{kind}-p{k}"
    if (out / "config.json").is_file() and (out / "shortrt.json").is_file():
        try:
            cached = load(out)
        except CheckpointError:
            cached = None  # made by an older shortrt or damaged: train it again
        record = (cached.layer_map.replacement or {}) if cached else {}
        from . import data

        source = data.calibration_texts(kw.get("texts") or "default")[1]
        if (record.get("kind") == kind and record.get("span") == sorted(lmap.removed)
                and record.get("data", {}).get("source") == source):
            return cached
    return replace(src, lmap, out, kind=kind, overwrite=True, **kw)
