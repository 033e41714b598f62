"""Write a pruned checkpoint: `prune(model, layer_map, out_dir)`.

The result is a standard checkpoint of the same architecture: the retained layers' tensors,
renumbered 0..k-1, `num_hidden_layers = k`, every per-layer config list trimmed to match, the
tokenizer and generation files copied, and shortrt.json recording the layer map and where it
came from. transformers builds each attention with `layer_idx` = its position in the new
model, so the KV cache lines up (no stale layer_idx from the dense model survives).

Tensors stream from the source safetensors one at a time into a temp directory next to
out_dir, which is renamed into place only when complete: there is never a half-written
checkpoint at out_dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError
from .layermap import LayerMap
from .safetensors_writer import TensorSource, write_sharded

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ATTENTION_PREFIXES = ("input_layernorm.", "self_attn.")
_MLP_PREFIXES = ("post_attention_layernorm.", "mlp.")
# Files that describe the weights or the layer map; everything else at the top level is copied.
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.index\.json)$|^(config|shortrt|source)\.json$")
# Config lists that may happen to have num_hidden_layers items without being per-layer.
_NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids",
                  "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "id2label", "label2id"}
MAX_SHARD_BYTES = 4 << 30


def prune(model, layer_map: LayerMap, out_dir, *, overwrite: bool = False, progress: bool = False,
          max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write the checkpoint `layer_map` describes to `out_dir` and return it as a shortrt Model.

    model: "default", a checkpoint directory, a .gguf file, or a Model. If the model is itself
    a pruned checkpoint, `layer_map` indexes its layers and the written shortrt.json is made
    relative to the original model.
    """
    from .layermap import layer_map_of
    from .sources import load

    src = load(model)
    if not isinstance(layer_map, LayerMap):
        raise TypeError(f"layer_map must be a shortrt LayerMap, got {type(layer_map).__name__}")
    config = src.config()
    num_layers = int(config["num_hidden_layers"])
    if layer_map.source_num_layers != num_layers:
        raise ValueError(f"the layer map is for a model with {layer_map.source_num_layers} layers but "
                         f"{src} has {num_layers}")
    kinds = {e.kind for e in layer_map.layers} - {"layer"}
    if kinds:
        raise ValueError(f"prune writes plain layers only; this map has {sorted(kinds)} entries "
                         "(their trained weights come from shortrt.replace)")
    out = _check_out_dir(Path(out_dir), src.path, overwrite)

    written = layer_map
    if src.shortrt_json() is not None:
        written = layer_map_of(src).then(layer_map)
    elif written.source is None or written.source != src.name:
        written = LayerMap.from_json({**layer_map.to_json(), "source": src.name})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with contextlib.ExitStack() as stack:
            tensors = _tensor_plan(src, layer_map, stack)
            if progress:
                tensors = _with_progress(tensors)
            write_sharded(tmp, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        _finish_checkpoint(tmp, out, src, _pruned_config(config, layer_map), written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(out)


def _finish_checkpoint(tmp: Path, out: Path, src, config: dict, written: LayerMap) -> None:
    """Beside the weights already in `tmp`: config.json, shortrt.json, the source's tokenizer and
    other files; then move `tmp` into place at `out`."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "shortrt.json").write_text(json.dumps(written.to_json(), indent=2) + "\n")
    for f in sorted(src.path.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not _NOT_COPIED.search(f.name):
            shutil.copy2(f, tmp / f.name)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
    _move_into_place(tmp, out)


def _check_out_dir(out: Path, source: Path, overwrite: bool) -> Path:
    out = out.expanduser()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite=True "
                                  "(--force on the command line) to replace it")
    resolved, src = out.resolve(), source.resolve()
    if resolved == src or src.is_relative_to(resolved):
        raise ValueError(f"output directory {out} would overwrite the source checkpoint {source}")
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _tensor_plan(src, layer_map: LayerMap, stack: contextlib.ExitStack) -> list[TensorSource]:
    """The output tensors in order: non-layer tensors, then each retained layer renamed."""
    from safetensors import safe_open

    files = src.safetensors_files()
    if not files:
        raise CheckpointError(f"{src.path} has no *.safetensors weights")
    where: dict[str, object] = {}
    for path in files:
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        for name in handle.keys():
            if name in where:
                raise CheckpointError(f"tensor {name!r} appears in more than one file of {src.path}")
            where[name] = handle

    by_layer: dict[int, list[tuple[str, str]]] = {}
    plan: list[TensorSource] = []
    for name in sorted(where):
        m = _LAYER_KEY.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append((name, m.group(2)))
        else:
            plan.append(_source(where[name], name, name))
    missing = [i for i in range(layer_map.source_num_layers) if i not in by_layer]
    if missing:
        raise CheckpointError(f"{src.path} has no 'model.layers.{{i}}.*' tensors for layers {missing}")
    for new_index, entry in enumerate(layer_map.layers):
        for name, rest in by_layer[entry.source]:
            if not entry.attention and rest.startswith(_ATTENTION_PREFIXES):
                continue
            if not entry.mlp and rest.startswith(_MLP_PREFIXES):
                continue
            plan.append(_source(where[name], name, f"model.layers.{new_index}.{rest}"))
    return plan


def _source(handle, name: str, new_name: str) -> TensorSource:
    sl = handle.get_slice(name)

    def read() -> bytes:
        t = handle.get_tensor(name).contiguous()
        import torch

        return t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return TensorSource(new_name, sl.get_dtype(), list(sl.get_shape()), read)


def _with_progress(tensors: list[TensorSource]) -> list[TensorSource]:
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="prune")

    def wrap(t: TensorSource) -> TensorSource:
        def read() -> bytes:
            data = t.read()
            bar.update(len(data))
            return data
        return TensorSource(t.name, t.dtype, t.shape, read)

    return [wrap(t) for t in tensors]


def _pruned_config(config: dict, layer_map: LayerMap) -> dict:
    """config.json for the kept layers: num_hidden_layers and every per-layer list trimmed."""
    num_layers = layer_map.source_num_layers
    keep = [e.source for e in layer_map.layers]
    out = dict(config)
    out["num_hidden_layers"] = len(keep)
    for key, value in config.items():
        if key in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != num_layers:
            continue
        out[key] = [value[i] for i in keep]
    return out
