"""Pruned checkpoints (shortrt.prune): layout, config, provenance, and equality with the masked dense model."""
import importlib
import json

import pytest
import torch
from torch import nn

import shortrt
from conftest import make_tiny_llama, read_meta, tensors_of
from shortrt.layer_plan import dense_plan, load_for_plan, plan_logits
from shortrt.layermap import LayerMap
from shortrt.pruning import prune


class PassThrough(nn.Module):
    """Stands in for a removed decoder layer: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def masked_dense_logits(path, removed, ids):
    """Logits of the dense model with the removed layers made identity (the oracle)."""
    hf = shortrt.load(path).load_hf()
    for i in removed:
        hf.model.layers[i] = PassThrough()
    with torch.no_grad():
        return hf(ids).logits


@pytest.fixture
def tiny6(tmp_path):
    return make_tiny_llama(tmp_path / "dense", num_layers=6, seed=3)


def test_pruned_checkpoint_layout_and_provenance(tiny6, tmp_path):
    (tiny6 / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    lmap = LayerMap.from_removed(6, [1, 4], method="shortgpt", scores={"metric": "bi", "bi": [0.1] * 6},
                                 calibration={"n_tokens": 1000})
    out = prune(tiny6, lmap, tmp_path / "p2")
    assert isinstance(out, shortrt.Model) and out.path == (tmp_path / "p2").resolve()
    config = out.config()
    assert config["num_hidden_layers"] == 4
    meta = read_meta(out)
    assert meta["format"] == "shortrt.layermap/1" and meta["source_num_layers"] == 6
    assert [e["source"] for e in meta["layers"]] == [0, 2, 3, 5] and meta["removed"] == [1, 4]
    assert meta["method"] == "shortgpt" and meta["calibration"] == {"n_tokens": 1000}
    assert meta["source"] == str(tiny6) and meta["scores"]["metric"] == "bi"
    assert (out.path / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    assert (out.path / "generation_config.json").exists()
    src, dst = tensors_of(tiny6), tensors_of(out.path)
    assert not any(k.startswith("model.layers.4.") for k in dst)
    for new, old in enumerate([0, 2, 3, 5]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(dst[f"model.layers.{new}.{name}"], src[f"model.layers.{old}.{name}"])
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_pruned_logits_equal_dense_with_layers_skipped_and_kv_cache_works(tiny6, tmp_path):
    removed = [1, 4]
    out = prune(tiny6, LayerMap.from_removed(6, removed), tmp_path / "p2")
    hf = out.load_hf()
    # The layer_idx bug: each attention must index the KV cache by its new position.
    assert [layer.self_attn.layer_idx for layer in hf.model.layers] == [0, 1, 2, 3]
    ids = torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pruned = hf(ids).logits
    diff = (pruned - masked_dense_logits(tiny6, removed, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = ids[:1, :5]
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_per_layer_config_lists_are_trimmed(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    config_path = tmp_path / "qwen" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["layer_types"] == ["full_attention"] * 4
    config["per_layer_note"] = ["a", "b", "c", "d"]  # any list of num_hidden_layers items is per layer
    config_path.write_text(json.dumps(config))
    out = prune(tmp_path / "qwen", LayerMap.from_removed(4, [0, 3]), tmp_path / "qwen-p")
    config = out.config()
    assert config["layer_types"] == ["full_attention"] * 2
    assert config["per_layer_note"] == ["b", "c"]
    assert config["num_hidden_layers"] == 2
    hf = out.load_hf()  # transformers checks len(layer_types) == num_hidden_layers
    assert hf.config.layer_types == ["full_attention"] * 2
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    assert hf.generate(ids, max_new_tokens=6, do_sample=False).tolist() == \
        hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False).tolist()


def test_sliding_window_layers_are_refused(tmp_path):
    """A Qwen2 with sliding-window layers would run as full attention: refused, not silently wrong."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=8, max_window_layers=2, max_position_embeddings=64)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    with pytest.raises(shortrt.CheckpointError, match="use_sliding_window=true is not supported"):
        prune(tmp_path / "qwen", LayerMap.from_removed(4, [0, 3]), tmp_path / "qwen-p")
    assert not (tmp_path / "qwen-p").exists()


def test_refuses_to_overwrite_unless_asked(tiny6, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    lmap = LayerMap.from_removed(6, [2])
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        prune(tiny6, lmap, target)
    assert (target / "keep.txt").read_text() == "user data"
    out = prune(tiny6, lmap, target, overwrite=True)
    assert out.config()["num_hidden_layers"] == 5 and not (target / "keep.txt").exists()
    with pytest.raises(ValueError, match="would overwrite the source"):
        prune(tiny6, lmap, tiny6, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prune(tiny6, lmap, tmp_path / "file")


def test_bad_maps_are_rejected_before_writing(tiny6, tmp_path):
    with pytest.raises(ValueError, match="for a model with 5 layers but .* has 6"):
        prune(tiny6, LayerMap.from_removed(5, [1]), tmp_path / "x")
    with pytest.raises(TypeError, match="must be a shortrt LayerMap"):
        prune(tiny6, {"removed": [1]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failure_mid_write_leaves_nothing(tiny6, tmp_path, monkeypatch):
    writer = importlib.import_module("shortrt.safetensors_writer")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_sharded", broken)
    with pytest.raises(OSError, match="disk full"):
        prune(tiny6, LayerMap.from_removed(6, [1]), tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_sharded_output_loads(tiny6, tmp_path):
    out = prune(tiny6, LayerMap.from_removed(6, [0, 5]), tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        diff = (out.load_hf()(ids).logits - masked_dense_logits(tiny6, [0, 5], ids)).abs().max().item()
    assert diff <= 1e-5


def test_attention_pruned_checkpoint_drops_tensors_and_runs(tiny6, tmp_path):
    from shortrt.reference import ReferenceModel

    lmap = LayerMap.from_removed_attention(6, [1, 3], method="attention")
    out = prune(tiny6, lmap, tmp_path / "att")
    names = tensors_of(out.path)
    assert not any(k.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm")) for k in names)
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    with pytest.raises(shortrt.CheckpointError, match="transformers cannot run it"):
        out.load_hf()
    hf, plan = load_for_plan(out)
    assert [s.attention for s in plan] == [True, False, True, False, True, True]
    ids = torch.randint(3, 256, (1, 11), generator=torch.Generator().manual_seed(1))
    mine = plan_logits(hf, ids, plan)
    dense_hf, _ = load_for_plan(tiny6)
    masked = plan_logits(dense_hf, ids, tuple(s if s.index not in (1, 3) else type(s)(s.index, False, True)
                                              for s in dense_plan(6)))
    assert (mine - masked).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = ReferenceModel.load(out.path)(ids)  # the runtime engineer's independent oracle
    assert (mine - ref).abs().max().item() <= 1e-4


def test_pruning_a_pruned_checkpoint_composes_the_map(tiny6, tmp_path):
    first = prune(tiny6, LayerMap.from_removed(6, [1]), tmp_path / "p1")      # keeps 0 2 3 4 5
    second = prune(first, LayerMap.from_removed(5, [3]), tmp_path / "p2")     # drops entry 3 = layer 4
    meta = read_meta(second)
    assert [e["source"] for e in meta["layers"]] == [0, 2, 3, 5] and meta["removed"] == [1, 4]
    assert meta["source_num_layers"] == 6 and meta["method"] == "manual+manual"
    ids = torch.tensor([[3, 9, 27, 81, 243]])
    with torch.no_grad():
        diff = (second.load_hf()(ids).logits - masked_dense_logits(tiny6, [1, 4], ids)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.slow
def test_default_model_pruned_by_eight_layers(default_model, tmp_path):
    """The real model: 8 layers out, pruned logits equal the masked dense model, cached generation is exact."""
    removed = [3, 8, 12, 16, 19, 22, 25, 27]
    out = prune(default_model, LayerMap.from_removed(30, removed, method="manual"), tmp_path / "p8")
    assert out.config()["num_hidden_layers"] == 22
    tok = out.tokenizer()
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    hf = out.load_hf()
    assert [layer.self_attn.layer_idx for layer in hf.model.layers] == list(range(22))
    with torch.no_grad():
        pruned = hf(ids).logits
    diff = (pruned - masked_dense_logits(default_model.path, removed, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    cached = hf.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
    uncached = hf.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_prune_command(tiny6, tmp_path, capsys):
    from shortrt.cli import main

    out = tmp_path / "cli"
    assert main(["prune", str(tiny6), "--layers", "1,2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 of 6 kept" in printed and "removed     1, 2" in printed
    assert read_meta(out)["removed"] == [1, 2]
    assert main(["prune", str(tiny6), "--remove", "1", "--method", "last", "--out", str(out)]) == 1
    assert "not empty; pass --force" in capsys.readouterr().err
    assert main(["prune", str(tiny6), "--remove", "2", "--out", str(tmp_path / "y")]) == 1
    assert "needs --scores" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a one-line usage error, exit code 2
        main(["prune", str(tiny6), "--layers", "1,x", "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2
    assert "argument --layers: expected comma-separated layer indices" in capsys.readouterr().err
    assert main(["prune", str(tiny6), "--remove", "1", "--method", "last", "--out", str(out), "--force"]) == 0
    assert read_meta(out)["removed"] == [4]


_PEAK_SCRIPT = """
import sys, shortrt
from shortrt.layermap import LayerMap
from shortrt.pruning import prune
src = shortrt.load(sys.argv[1])
src.tensors  # headers read in both runs
if sys.argv[2] == "prune":
    prune(src, LayerMap.from_removed(2, [1]), sys.argv[3])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def test_prune_memory_stays_flat_with_a_large_tensor(tmp_path):
    """A 384 MiB embedding is copied in pieces of CHUNK_BYTES: prune's peak resident memory
    (VmHWM, mapped file pages included) rises by about two pieces over only loading the
    checkpoint (whole-tensor reads through safetensors' mmap added 771 MiB here)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from shortrt.checkpoint import CHUNK_BYTES

    path = make_tiny_llama(tmp_path / "wide", num_layers=2)
    vocab, hidden, inter = 98304, 1024, 64  # only the embedding is large: 384 MiB of fp32
    embedding = torch.empty(vocab, hidden).normal_(generator=torch.Generator().manual_seed(0))
    tensors = {"model.embed_tokens.weight": embedding, "model.norm.weight": torch.ones(hidden)}
    for i in range(2):
        shapes = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                  "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        tensors.update({f"model.layers.{i}.{k}.weight": torch.full(v, 0.01) for k, v in shapes.items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_size=hidden, vocab_size=vocab, intermediate_size=inter, num_attention_heads=16,
               num_key_value_heads=16, head_dim=64)
    (path / "config.json").write_text(json.dumps(cfg))
    del tensors

    def peak(*args):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), *args], check=True,
                             capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    rise = peak("prune", str(tmp_path / "pruned")) - peak("load")
    # At most two pieces are alive at once (the one written and the next one read).
    assert rise < 2 * CHUNK_BYTES + (32 << 20), f"prune's peak rose by {rise / 2**20:.0f} MiB"
    written = tensors_of(tmp_path / "pruned")
    assert torch.equal(written["model.embed_tokens.weight"], embedding)
    assert "model.layers.1.mlp.up_proj.weight" not in written
