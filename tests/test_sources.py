"""shortrt.load: model sources resolve to checkpoint directories with clear errors otherwise."""
import json
import time

import pytest

import shortrt
from shortrt.errors import CheckpointError


def test_load_checkpoint_dir(tiny_llama):
    model = shortrt.load(tiny_llama)
    assert model.path == tiny_llama.resolve()
    assert model.config()["num_hidden_layers"] == 4
    assert shortrt.load(model) is model


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        shortrt.load(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        shortrt.load(tmp_path)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        shortrt.load(tmp_path)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        shortrt.load(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        shortrt.load(f)


def test_default_model_is_converted_once_and_reused(default_model):
    cfg = default_model.config()
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    t0 = time.perf_counter()
    again = shortrt.load("default")
    assert time.perf_counter() - t0 < 1.0  # cached: no second conversion
    assert again.path == default_model.path
    assert (again.path / "tokenizer.json").is_file()
