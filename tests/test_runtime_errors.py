"""Bad input to the runtime raises a clear Python exception, never a crash."""
import json

import pytest

from runtime_models import make_tiny, write_pruned
from shortrt import _C
from shortrt.engine import Engine
from shortrt.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("err") / "m", tokenizer=True)[0]


@pytest.fixture(scope="module")
def eng(tiny):
    return Engine(tiny, max_seq=32)


def edited_copy(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
])
def test_bad_generation_options(eng, kwargs, message):
    with pytest.raises(ValueError, match=message):
        eng.generate_ids([1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match=message):
        list(eng.stream("Once", **kwargs))


def test_cpp_layer_validates_too(tiny):
    raw = _C.Engine(str(tiny), "fp32", 1, 32, 1, [])
    with pytest.raises(ValueError, match="temperature must be"):
        raw.generate([[1, 2]], 4, -1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        raw.generate([[1, 2]], 4, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        raw.generate([[1, 2]], 4, 1.0, -3)
    with pytest.raises(ValueError, match="2 prompts exceed the engine's max_batch of 1"):
        raw.generate([[1], [2]], 4)
    with pytest.raises(ValueError, match="is empty"):
        raw.generate([[]], 4)
    with pytest.raises(ValueError, match="no prompts"):
        raw.generate([], 4)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        _C.Engine(str(tiny), "fp8")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _C.Engine(str(tiny), "fp32", -2)


def test_empty_prompt(eng):
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate_ids([])
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        eng.logits([])


def test_prompt_longer_than_context(eng):
    with pytest.raises(ValueError, match="prompt of 30 tokens \\+ 5 new tokens exceeds the context of 32"):
        eng.generate_ids(list(range(3, 33)), max_new_tokens=5)
    with pytest.raises(ValueError, match="exceed the context of 32"):
        eng.logits([1] * 33)
    assert len(eng.generate_ids(list(range(3, 33)), max_new_tokens=2, stop=[])) == 2  # exactly fits


def test_token_outside_vocab(eng):
    with pytest.raises(ValueError, match="token id 300 at position 1 of the prompt is outside the vocabulary of 300"):
        eng.generate_ids([1, 300])
    with pytest.raises(ValueError, match="token id -1 .* outside the vocabulary"):
        eng.logits([-1])


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(dtype="fp16"), ValueError, "unknown dtype 'fp16'"),
    (dict(threads=-1), ValueError, "threads must be"),
    (dict(max_batch=0), ValueError, "max_batch must be"),
    (dict(max_seq=0), ValueError, "max_seq must be"),
    (dict(max_seq=10_000), CheckpointError, "max_seq 10000 exceeds the model's max_position_embeddings 256"),
    (dict(skip_layers=[4]), CheckpointError, "layer 4 is out of range for a checkpoint of 4 layers"),
    (dict(skip_layers=[1, 1]), CheckpointError, "layer 1 is listed twice"),
])
def test_bad_engine_options(tiny, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        Engine(tiny, **kwargs)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        Engine(tmp_path / "nope")


@pytest.mark.parametrize("changes,message", [
    (dict(intermediate_size=128), r"mlp.gate_proj.weight.*expected shape \[128, 64\], found \[96, 64\]"),
    (dict(num_key_value_heads=4), r"k_proj.weight.*expected shape"),
    (dict(vocab_size=512), r"embed_tokens.weight.*expected shape \[512, 64\]"),
    (dict(num_hidden_layers=5), r"model.layers.4.* not found"),
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(hidden_act="gelu"), 'unsupported hidden_act "gelu"'),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}),
     "unsupported rope scaling type 'yarn'"),
    (dict(num_attention_heads=3), "not a multiple of num_key_value_heads|not divisible"),
    (dict(hidden_size=-64), "hidden_size' must be a positive integer"),
])
def test_config_contradicting_checkpoint(tiny, tmp_path, changes, message):
    bad = edited_copy(tiny, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=message):
        Engine(bad)


def test_int8_needs_widths_multiple_of_32(tmp_path):
    path, _ = make_tiny(tmp_path / "odd", intermediate_size=72)
    Engine(path, dtype="bf16")  # fine
    with pytest.raises(CheckpointError, match="multiple of 32"):
        Engine(path, dtype="int8")


def test_bad_shortrt_json(tiny, tmp_path):
    pruned = write_pruned(tiny, tmp_path / "p", [0, 2, 3])
    meta = json.loads((pruned / "shortrt.json").read_text())
    meta["layers"] = meta["layers"][:2]
    (pruned / "shortrt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shortrt.json lists 2 layers but config.json has num_hidden_layers = 3"):
        Engine(pruned)
    # attention removed from the file but shortrt.json still claims it
    pruned2 = write_pruned(tiny, tmp_path / "p2", [0, 1], flags={1: (False, True)})
    meta = json.loads((pruned2 / "shortrt.json").read_text())
    meta["layers"][1]["attention"] = True
    (pruned2 / "shortrt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.layers.1.input_layernorm.weight' not found"):
        Engine(pruned2)


def test_truncated_weights_file(tiny, tmp_path):
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(tiny, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises((CheckpointError, ValueError)):
        Engine(bad)
