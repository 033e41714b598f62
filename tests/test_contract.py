"""The checkpoint contract: the Python reader (shortrt.checkpoint) and the C++ reader
(shortrt._C.read_checkpoint, what the Engine runs) give the same verdict on every checkpoint,
with the same one-line message, on a table of malformed ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime_models import make_tiny, write_pruned
from shortrt import _C, checkpoint
from shortrt.errors import CheckpointError


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("contract") / "dense", num_hidden_layers=3)[0]


@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory):
    """Layers 0 and 2 of the dense model; the new layer 1 (old 2) without its attention."""
    return write_pruned(dense, tmp_path_factory.mktemp("contract") / "pruned", [0, 2], flags={1: (False, True)})


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def meta(edit):
    return lambda d: edit_json(d / "shortrt.json", edit)


def config(**changes):
    return lambda d: edit_json(d / "config.json", lambda c: c.update(changes))


def entry(i, **changes):
    return meta(lambda m: m["layers"][i].update(changes))


def entry_drop(i, key):
    return meta(lambda m: m["layers"][i].pop(key))


def tensors(edit):
    def apply(d):
        t = load_file(d / "model.safetensors")
        edit(t)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return apply


def add_attention_tensors(dense_dir):
    """Give the attention-less layer 1 the attention tensors of the dense model's layer 2."""
    def edit(t):
        src = load_file(dense_dir / "model.safetensors")
        for name, value in src.items():
            if name.startswith("model.layers.2.") and ("self_attn" in name or "input_layernorm" in name):
                t[name.replace("layers.2.", "layers.1.")] = value
    return tensors(edit)


def raw_text(name, text):
    return lambda d: (d / name).write_text(text)


def replace_weights_with(kind):
    def apply(d):
        (d / "model.safetensors").unlink()
        if kind == "dir":
            (d / "model.safetensors").mkdir()
        else:
            os.mkfifo(d / "model.safetensors")
    return apply


def index_naming_missing_shard(d):
    names = list(load_file(d / "model.safetensors"))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


# (id, base ("dense" or "pruned"), mutation, phrase both messages contain)
CASES = [
    ("attention-null", "pruned", entry(1, attention=None), "layers[1].attention must be true or false, got null"),
    ("attention-string", "pruned", entry(1, attention="false"), 'layers[1].attention must be true or false, got "false"'),
    ("attention-int", "pruned", entry(0, attention=1), "layers[0].attention must be true or false, got 1"),
    ("mlp-missing", "pruned", entry_drop(0, "mlp"), "layers[0] is missing 'mlp'"),
    ("kind-unknown", "pruned", entry(0, kind="magic"), 'layers[0].kind "magic" is not one of'),
    ("entry-unknown-key", "pruned", entry(0, atention=True), "layers[0] has unknown key 'atention'"),
    ("source-float", "pruned", entry(0, source=0.0), "layers[0].source must be a layer index"),
    ("source-bool", "pruned", entry(0, source=True), "layers[0].source must be a layer index"),
    ("source-negative", "pruned", entry(0, source=-1), "layer entry 0 source index -1 is out of range"),
    ("source-out-of-range", "pruned", entry(1, source=7), "layer entry 1 source index 7 is out of range"),
    ("source-duplicate", "pruned", entry(1, source=0), "original layer 0 appears in more than one entry"),
    ("neither-sublayer", "pruned", entry(1, mlp=False), "layer entry 1 has neither attention nor MLP"),
    ("mlp-replacement-with-attention", "pruned", entry(1, kind="mlp_replacement", source=[1, 2], attention=True),
     "is an mlp_replacement"),
    ("format", "pruned", meta(lambda m: m.update(format="shortrt.layermap/9")), "unsupported format"),
    ("format-missing", "pruned", meta(lambda m: m.pop("format")), "unsupported format null"),
    ("top-unknown-key", "pruned", meta(lambda m: m.update(extra=1)), "unknown key 'extra'"),
    ("healing-not-object", "pruned", meta(lambda m: m.update(healing=[1])), "'healing' must be an object"),
    ("budget-not-object", "pruned", meta(lambda m: m.update(budget=1.3)), "'budget' must be an object"),
    ("source-relative", "pruned", meta(lambda m: m.update(source="out/model")),
     "'source' must be \"default\" or an absolute path"),
    ("source-num-layers-bool", "pruned", meta(lambda m: m.update(source_num_layers=True)),
     "'source_num_layers' must be a positive integer"),
    ("removed-not-a-list", "pruned", meta(lambda m: m.update(removed=1)), "'removed' must be a list"),
    ("removed-overlaps", "pruned", meta(lambda m: m.update(removed=[0, 1])), "are both kept and removed"),
    ("layer-unaccounted", "pruned", meta(lambda m: m.update(removed=[])), "neither kept nor listed in 'removed'"),
    ("layers-count", "pruned", meta(lambda m: m.update(layers=m["layers"][:1])),
     "shortrt.json lists 1 layers but config.json has num_hidden_layers = 2"),
    ("layers-empty", "pruned", meta(lambda m: m.update(layers=[])), "'layers' is empty"),
    ("duplicate-json-key", "pruned", raw_text("shortrt.json", '{"format": 1, "format": 2}'), "duplicate key"),
    ("attention-claimed-not-stored", "pruned", entry(1, attention=True),
     "tensor 'model.layers.1.input_layernorm.weight' not found in the checkpoint"),
    ("attention-stored-not-claimed", "pruned", None,  # filled in below (needs the dense dir)
     "tensor 'model.layers.1.input_layernorm.weight' exists but shortrt.json says layer 1 has no attention"),
    ("fewer-layers-than-tensors", "dense", config(num_hidden_layers=2),
     "is for layer 2 but config.json has num_hidden_layers = 2"),
    ("unexpected-tensor", "dense", tensors(lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
     "unexpected tensor 'model.extra.weight'"),
    ("wrong-shape", "dense", config(intermediate_size=128), "expected shape [128, 64], found [96, 64]"),
    ("wrong-dtype", "dense", tensors(lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
     "tensor 'model.norm.weight' has dtype I32"),
    ("stray-weights-file", "dense", lambda d: shutil.copy(d / "model.safetensors", d / "extra.safetensors"),
     "stray weights file 'extra.safetensors'"),
    ("weights-is-a-directory", "dense", replace_weights_with("dir"), "model.safetensors: it is a directory, not a safetensors file"),
    ("weights-is-a-fifo", "dense", replace_weights_with("fifo"), "model.safetensors: it is a FIFO (named pipe), not a safetensors file"),
    ("no-weights", "dense", lambda d: (d / "model.safetensors").rename(d / "weights.safetensors"),
     "has no weights: expected model.safetensors"),
    ("index-missing-shard", "dense", index_naming_missing_shard, "names missing shard 'model-00002-of-00002"),
    ("heads-zero", "dense", config(num_attention_heads=0), "'num_attention_heads' must be a positive integer, got 0"),
    ("hidden-float", "dense", config(hidden_size=64.0), "'hidden_size' must be a positive integer"),
    ("hidden-string", "dense", config(hidden_size="64"), "'hidden_size' must be a positive integer, got \"64\""),
    ("tie-string", "dense", config(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
    ("eos-string", "dense", config(eos_token_id="2"), "eos_token_id must be an integer or a list of integers"),
    ("sliding-layer-types", "dense", config(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     'layer_types "sliding_attention" is not supported'),
    ("architecture", "dense", config(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    ("model-type", "dense", config(architectures=None, model_type="gpt2"), "unsupported model_type 'gpt2'"),
    ("rope-type", "dense", config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "unsupported rope scaling type 'yarn'"),
    ("rms-eps", "dense", config(rms_norm_eps=0), "rms_norm_eps must be positive"),
    ("config-not-json", "dense", raw_text("config.json", "{not json"), "config.json"),
    ("config-missing", "dense", lambda d: (d / "config.json").unlink(), "config.json is missing"),
]


def python_verdict(path: Path, skip=()) -> str:
    try:
        checkpoint.Model(path, str(path), str(path)).check().plan(skip)
    except (CheckpointError, FileNotFoundError) as exc:
        return str(exc)
    return "ok"


def cpp_verdict(path: Path, skip=()) -> str:
    # In a child process with a timeout: a reader that blocks (on a FIFO) must fail the test, not hang it.
    code = ("import sys\nfrom shortrt import _C\ntry:\n    _C.read_checkpoint(sys.argv[1], [int(s) for s in sys.argv[2:]])\n"
            "except OSError as e:\n    print(e.strerror if e.errno else e)\n"
            "except ValueError as e:\n    print(e)\nelse:\n    print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code, str(path), *map(str, skip)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.rstrip("\n")


def strip_dir(message: str, path: Path) -> str:
    """Both readers may start a message with the checkpoint directory; compare what follows."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_readers_refuse_alike(case, dense, pruned, tmp_path):
    name, base, mutate, phrase = case
    path = tmp_path / name
    shutil.copytree(dense if base == "dense" else pruned, path)
    if mutate is None:
        mutate = add_attention_tensors(dense)
    mutate(path)
    py, cpp = python_verdict(path), cpp_verdict(path)
    assert phrase in py, f"Python: {py}"
    assert phrase in cpp, f"C++: {cpp}"
    assert "\n" not in py and "\n" not in cpp
    if name not in ("config-not-json", "duplicate-json-key"):  # each JSON parser words syntax errors its own way
        assert strip_dir(py, path) == strip_dir(cpp, path)


def test_both_readers_accept_alike(dense, pruned):
    for path in (dense, pruned):
        assert python_verdict(path) == "ok" and cpp_verdict(path) == "ok"
    m = checkpoint.load(pruned)
    info = _C.read_checkpoint(str(pruned))
    assert [(s.index, s.attention, s.mlp) for s in m.plan()] == [p[:3] for p in info["plan"]] == \
        [(0, True, True), (1, False, True)]
    assert info["kv_slots"] == 1 and [p[3] for p in info["plan"]] == [0, -1]


@pytest.mark.parametrize("skip,phrase", [
    ([0, 1], "skip_layers leaves no layer to run (the checkpoint has 2)"),
    ([5], "skip_layers: layer 5 is out of range for a checkpoint of 2 layers"),
    ([1, 1], "skip_layers: layer 1 is listed twice"),
])
def test_skip_layers_alike(pruned, skip, phrase):
    assert phrase in python_verdict(pruned, skip)
    assert phrase in cpp_verdict(pruned, skip)


def test_one_list_of_architectures():
    assert list(checkpoint.ARCHITECTURES) == _C.supported_architectures()


def test_engine_refuses_what_the_contract_refuses(pruned, tmp_path):
    """The Engine reads through both: a map with "attention": null is refused, not run with attention."""
    from shortrt.engine import Engine

    path = tmp_path / "p"
    shutil.copytree(pruned, path)
    entry(1, attention=None)(path)
    with pytest.raises(CheckpointError, match="layers\\[1\\].attention must be true or false, got null"):
        Engine(path)
    with pytest.raises(ValueError, match="layers\\[1\\].attention must be true or false, got null"):
        _C.Engine(str(path), "fp32", 1, 32, 1, [])


@pytest.mark.parametrize("mutate,phrase", [
    (tensors(lambda t: t.pop("model.layers.0.self_attn.q_norm.weight")), "model.layers.0.self_attn.q_norm.weight"),
    (tensors(lambda t: t.update({"model.layers.1.self_attn.k_norm.weight": torch.ones(8)})),
     "model.layers.1.self_attn.k_norm.weight"),
    (config(use_sliding_window=True), "use_sliding_window=true is not supported"),
    (config(attention_bias=True), "attention_bias=true is not supported for Qwen3ForCausalLM"),
])
def test_qwen3_checkpoints_are_read_alike(tmp_path, mutate, phrase):
    """Qwen3's per-head q/k norms are part of the tensor set in both readers."""
    path = make_tiny(tmp_path / "qwen3", "qwen3", num_hidden_layers=2)[0]
    assert python_verdict(path) == "ok" and cpp_verdict(path) == "ok"
    mutate(path)
    py, cpp = python_verdict(path), cpp_verdict(path)
    assert phrase in py, f"Python: {py}"
    assert strip_dir(py, path) == strip_dir(cpp, path)
