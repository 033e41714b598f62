"""`shortrt export --to gguf` (shortrt.gguf_export), checked without llama.cpp: every file read back
with gguf.GGUFReader.

Per exported file: the architecture (deci exactly when some layer has no attention), block_count =
layers written, every per-layer array of that length, head counts 0 exactly where the attention
tensors are absent, the tokenizer present, and every tensor equal to the checkpoint's within its
encoding's error: f32 exact, f16 = the fp16 rounding, Q8_0 within 0.57 d and Q4_0 within 1.01 d
of each value (d = the block's scale: half a step plus the fp16 rounding of d, and for Q4_0 the
clamp of +8 d to +7 d), and bit-identical to the gguf package's own quantizer. Files of standard
architectures read back through shortrt's GGUF source give the original fp32 logits within 1e-5.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import shortrt  # noqa: E402
from runtime_models import IDS_SHORT, make_tiny, prose, rel_err, write_pruned  # noqa: E402
from shortrt import gguf_quants  # noqa: E402
from shortrt.cli import main  # noqa: E402
from shortrt.errors import ShortrtError  # noqa: E402
from shortrt.gguf_export import ExportError, export_gguf, gguf_name, rope_permute  # noqa: E402
from shortrt.layermap import LayerMap  # noqa: E402
from shortrt.reference import ReferenceModel  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ["f32", "f16", "q8_0", "q4_0"]
FAST_REPLACE = dict(n_tokens=2048, seq_len=64, steps=3, progress=False)
FAST_HEAL = dict(n_tokens=2048, seq_len=64, steps=3, batch=4, precision="fp32", progress=False)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return build_variants(tmp_path_factory.mktemp("export"))


def build_variants(root):
    """name -> checkpoint: a tiny 6-layer Llama and every kind of checkpoint shortrt makes of it."""
    from shortrt.healing import heal
    from shortrt.replacement import replace

    dense, _ = make_tiny(root / "dense", num_hidden_layers=6, tokenizer=True)
    out = {"dense": dense}
    out["shortgpt"] = shortrt.prune(dense, LayerMap.from_removed(6, [1, 4], method="shortgpt"), root / "shortgpt").path
    out["span"] = shortrt.prune(dense, LayerMap.from_removed(6, [2, 3], method="span"), root / "span").path
    out["attention"] = shortrt.prune(dense, LayerMap.from_removed_attention(6, [2, 4], method="attention"),
                                     root / "attention").path
    span = LayerMap.from_removed(6, [2, 3, 4], method="span")
    for kind in ("layer", "mlp"):
        out[f"span+{kind}"] = replace(dense, span, root / f"span+{kind}", kind=kind, texts=prose(),
                                      **FAST_REPLACE).path
    out["shortgpt+heal"] = heal(out["shortgpt"], root / "healed", texts=prose(), **FAST_HEAL).path
    out["attention+heal"] = heal(out["attention"], root / "att-healed", texts=prose(), **FAST_HEAL).path
    out["mistral"], _ = make_tiny(root / "mistral", arch="mistral", num_hidden_layers=6, tokenizer=True)
    out["llama3-rope"], _ = make_tiny(root / "llama3-rope", num_hidden_layers=6, tokenizer=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    out["linear-rope"], _ = make_tiny(root / "linear-rope", num_hidden_layers=6, tokenizer=True,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    qwen, _ = make_tiny(root / "qwen2", arch="qwen2", num_hidden_layers=6, tokenizer=True)
    out["qwen2"] = qwen
    out["qwen2-attention"] = shortrt.prune(qwen, LayerMap.from_removed_attention(6, [1, 5]), root / "qwen2-att").path
    return out


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(s) for s in t.shape[::-1]))


def check_values(name, t, want: np.ndarray) -> None:
    """Tensor `t` of the file against the checkpoint's float32 values, as the module doc states."""
    got = dequantized(t)
    assert got.shape == want.shape, name
    kind = t.tensor_type
    if kind == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif kind == Q.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    else:
        np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(want, kind), err_msg=name)
        blocks = want.reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        d, bound = (amax / 127, 0.57) if kind == Q.Q8_0 else (amax / 8, 1.01)
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= bound * d + 1e-12).all(), f"{name}: error {err.max()} over {bound} d"


def check_file(path, ckpt, qtype) -> dict:
    """Everything the module doc promises about one exported file; returns its fields."""
    m = shortrt.load(ckpt)
    cfg, lmap = m.model_config, m.layer_map
    r = gguf.GGUFReader(str(path))
    f = fields(r)
    k = len(lmap.layers)
    attention = [e.attention for e in lmap.layers]
    families = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
    arch = "deci" if not all(attention) else families[cfg.architecture]
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == k
    for key, value in f.items():
        if key.startswith(f"{arch}.") and isinstance(value, list):
            assert len(value) == k, f"{key} has {len(value)} entries for {k} blocks"
    heads, kv = f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]
    if arch == "deci":
        assert heads == [cfg.n_heads if a else 0 for a in attention]
        assert kv == [cfg.n_kv_heads if a else 0 for a in attention]
    else:
        assert (heads, kv) == (cfg.n_heads, cfg.n_kv_heads)
    tensors = {t.name: t for t in r.tensors}
    for i, a in enumerate(attention):
        has = {n.split(".")[2] for n in tensors if n.startswith(f"blk.{i}.")}
        assert ({"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"} <= has) == a
        assert a or not has & {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"}
        assert {"ffn_norm", "ffn_gate", "ffn_up", "ffn_down"} <= has
    assert not any(n.startswith(f"blk.{k}.") for n in tensors)
    assert len(f["tokenizer.ggml.tokens"]) == cfg.vocab and f["tokenizer.ggml.merges"]
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert json.loads(f["shortrt.layer_map"])["layers"] == lmap.to_json()["layers"]
    values = m.read_tensors()
    expected = {gguf_name(n): n for n in values if not (n == "lm_head.weight" and cfg.tie_embeddings)}
    if cfg.rope_type == "llama3":
        factors = dequantized(tensors.pop("rope_freqs.weight"))
        assert factors.shape == (cfg.head_dim // 2,) and factors[0] == 1.0 and factors[-1] == cfg.rope_factor
        assert np.all(np.diff(factors) >= 0)  # 1 for short wavelengths, rising to `factor` for long ones
    if cfg.rope_type == "linear":
        assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == cfg.rope_factor
    assert set(tensors) == set(expected)
    for g, name in expected.items():
        want = values[name].numpy()
        if arch in ("llama", "deci") and g.endswith((".attn_q.weight", ".attn_q.bias")):
            want = rope_permute(want, cfg.n_heads)
        elif arch in ("llama", "deci") and g.endswith((".attn_k.weight", ".attn_k.bias")):
            want = rope_permute(want, cfg.n_kv_heads)
        check_values(g, tensors[g], want)
        if want.ndim == 1:
            assert tensors[g].tensor_type == Q.F32, f"{g} must stay f32"
    return f


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("name", ["dense", "shortgpt", "span", "attention", "span+layer", "span+mlp",
                                  "shortgpt+heal", "attention+heal", "mistral", "llama3-rope", "linear-rope",
                                  "qwen2", "qwen2-attention"])
def test_every_variant_exports_a_consistent_gguf(variants, name, qtype, tmp_path):
    out = export_gguf(variants[name], tmp_path / f"{name}.gguf", qtype=qtype)
    f = check_file(out, variants[name], qtype)
    assert f["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qtype]
    if qtype in ("q8_0", "q4_0"):
        assert f["general.quantized_by"] == f"shortrt export ({gguf_quants.encoder()})"
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.gguf"]  # no temporary file left


def test_q4_0_keeps_the_embedding_and_output_at_q8_0(variants, tmp_path):
    r = gguf.GGUFReader(str(export_gguf(variants["dense"], tmp_path / "d.gguf", qtype="q4_0")))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == types["output.weight"] == Q.Q8_0
    assert types["blk.0.ffn_up.weight"] == Q.Q4_0 and types["blk.0.ffn_norm.weight"] == Q.F32


def test_numpy_packing_is_the_gguf_package_quantizer_bit_for_bit():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((48, 128)) * rng.uniform(1e-4, 50, (48, 1))).astype(np.float32)
    x[0] = 0  # all-zero blocks: scale 0
    x[1, :32] = 3.0  # every value the maximum
    x[2, :32] = np.float32(0.25) * np.arange(-16, 16)  # exact halves after scaling
    x[3, 5], x[3, 9] = -4.0, 4.0  # two maxima of opposite sign: the first one sets Q4_0's sign
    for fn, qtype in ((gguf_quants.quantize_q8_0_numpy, Q.Q8_0), (gguf_quants.quantize_q4_0_numpy, Q.Q4_0)):
        np.testing.assert_array_equal(fn(x), gguf.quants.quantize(x, qtype))
    with pytest.raises(ValueError, match="blocks of 32"):
        gguf_quants.quantize_q8_0_numpy(np.zeros((2, 33), np.float32))


@pytest.mark.parametrize("name", ["dense", "shortgpt", "span", "span+layer", "shortgpt+heal", "qwen2", "mistral"])
def test_shortrt_reads_the_exported_gguf_back_with_the_same_logits(variants, name, tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    out = export_gguf(variants[name], tmp_path / f"{name}.gguf", qtype="f32")
    back = shortrt.load(out, progress=False)
    ids = torch.tensor([IDS_SHORT])
    with torch.no_grad():
        want = ReferenceModel.load(variants[name]).forward(ids)[0].numpy()
        got = ReferenceModel.load(back).forward(ids)[0].numpy()
    assert rel_err(got, want) < 1e-5


def test_refusals_come_before_anything_is_written(variants, tmp_path):
    src = variants["dense"]
    no_mlp = write_pruned(src, tmp_path / "no-mlp", [0, 1, 2, 3, 4, 5], {2: (True, False)})
    with pytest.raises(ExportError, match="keep attention but have no MLP"):
        export_gguf(no_mlp, tmp_path / "a.gguf")
    first = write_pruned(src, tmp_path / "first", [0, 1, 2, 3, 4, 5], {0: (False, True)})
    with pytest.raises(ExportError, match="layer 0 has no attention"):
        export_gguf(first, tmp_path / "b.gguf")
    with pytest.raises(ExportError, match="unknown --type 'q5_k'"):
        export_gguf(src, tmp_path / "c.gguf", qtype="q5_k")
    with pytest.raises(ExportError, match="was not converted from one"):
        export_gguf(src, tmp_path / "d.gguf", qtype="source")
    with pytest.raises(ExportError, match="is a directory"):
        export_gguf(src, tmp_path)
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="exists"):
        export_gguf(src, mine)
    assert mine.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "mine.gguf", "no-mlp"]
    export_gguf(src, mine, overwrite=True)
    assert gguf.GGUFReader(str(mine)).fields["llama.block_count"].contents() == 6


def test_an_interrupted_export_leaves_no_file(variants, tmp_path, monkeypatch):
    calls = []

    def interrupted(x, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(x, qtype)

    original = gguf_quants.encode
    monkeypatch.setattr(gguf_quants, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(variants["attention"], tmp_path / "x.gguf", qtype="q8_0")
    assert list(tmp_path.iterdir()) == []


def test_export_command(variants, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    assert main(["export", str(variants["span+mlp"]), "--to", "gguf", "--type", "q8_0", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "architecture deci" in text and "blocks       4, 3 with attention" in text
    assert main(["export", str(variants["span+mlp"]), "--type", "q8_0", "--out", str(out)]) == 1
    assert "pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(variants["dense"]), "--type", "q3", "--out", str(out)])
    assert "invalid choice: 'q3'" in capsys.readouterr().err


# ---- the default model: its own GGUF's tokenizer, and --type source (blocks copied as stored) ----

@pytest.fixture(scope="module")
def default_pruned(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("default-export")
    removed = [20, 21, 22, 23, 24, 25, 26, 27]
    return {"shortgpt": shortrt.prune(default_model, LayerMap.from_removed(30, removed), root / "p8").path,
            "attention": shortrt.prune(default_model, LayerMap.from_removed_attention(30, removed), root / "a8").path}


def test_default_model_exports_with_its_gguf_tokenizer(default_model, default_pruned, tmp_path):
    from shortrt.checkpoint import default_gguf_path

    src = {k: f.contents() for k, f in gguf.GGUFReader(str(default_gguf_path())).fields.items()}
    out = export_gguf(default_pruned["attention"], tmp_path / "a8.gguf", qtype="q8_0")
    f = check_file(out, default_pruned["attention"], "q8_0")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert f[key] == src[key], key
    assert f["deci.attention.head_count"] == [9] * 20 + [0] * 8 + [9] * 2


@pytest.mark.parametrize("name", ["shortgpt", "attention"])
def test_source_type_copies_the_original_blocks(default_pruned, name, tmp_path):
    from shortrt.checkpoint import default_gguf_path

    original = {t.name: t for t in gguf.GGUFReader(str(default_gguf_path())).tensors}
    out = export_gguf(default_pruned[name], tmp_path / "s.gguf", qtype="source")
    r = gguf.GGUFReader(str(out))
    arch = r.fields["general.architecture"].contents()
    assert arch == ("llama" if name == "shortgpt" else "deci")
    assert r.fields[f"{arch}.block_count"].contents() == (22 if name == "shortgpt" else 30)
    lmap = shortrt.load(default_pruned[name]).layer_map
    for t in r.tensors:
        parts = t.name.split(".", 2)
        old = t.name if parts[0] != "blk" else f"blk.{lmap.layers[int(parts[1])].source}.{parts[2]}"
        assert t.tensor_type == original[old].tensor_type
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(original[old].data))
    if name == "attention":
        assert r.fields["deci.attention.head_count_kv"].contents() == [3] * 20 + [0] * 8 + [3] * 2
        assert not any(t.name.startswith("blk.20.attn_") for t in r.tensors)


def test_a_killed_exports_temporary_file_is_removed_by_the_next_one(variants, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.gguf.tmp-{int(dead.stdout)}-abc123"
    stale.write_bytes(b"half")
    mine = tmp_path / ".notes.tmp"  # not a staging name: left alone
    mine.write_bytes(b"keep")
    export_gguf(variants["dense"], tmp_path / "x.gguf", qtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "x.gguf"]


# ---- a GGUF source read tensor by tensor (shortrt.load("x.gguf")) ------------------------------

def transformers_gguf_state(path):
    """What transformers' own GGUF loading gives for the file (the reference)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}


@pytest.mark.parametrize("name,qtype", [("dense", "f32"), ("dense", "q8_0"), ("qwen2", "q4_0"), ("span+layer", "f16"),
                                        ("llama3-rope", "q8_0")])
def test_gguf_source_reads_what_transformers_reads(variants, name, qtype, tmp_path):
    """gguf_to_checkpoint, one tensor (and piece of rows) at a time, gives transformers' GGUF
    loading bit for bit: same dequantization, same q/k row order, same config and tokenizer."""
    from safetensors.torch import load_file

    from shortrt.gguf_export import gguf_to_checkpoint

    path = export_gguf(variants[name], tmp_path / f"{name}.gguf", qtype=qtype)
    out = tmp_path / "read"
    out.mkdir()
    gguf_to_checkpoint(path, out)
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    want = transformers_gguf_state(path)
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    from transformers import AutoConfig

    assert json.loads((out / "config.json").read_text()) == \
        json.loads(AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_json_string()) | {
            "architectures": json.loads((out / "config.json").read_text())["architectures"], "dtype": "float32"}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_gguf_source_pieces_are_bounded(variants, tmp_path, monkeypatch):
    """With pieces of a few rows the result is the same (the embedding is read in many pieces)."""
    import shortrt.checkpoint as checkpoint
    from safetensors.torch import load_file

    from shortrt.gguf_export import gguf_to_checkpoint

    path = export_gguf(variants["dense"], tmp_path / "d.gguf", qtype="q8_0")
    outs = []
    for chunk in (checkpoint.CHUNK_BYTES, 3 * 64 * 16):
        monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk)
        out = tmp_path / f"read-{chunk}"
        out.mkdir()
        gguf_to_checkpoint(path, out)
        outs.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_gguf_source_refuses_unreadable_architectures_and_lying_files(variants, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    from shortrt.gguf_export import gguf_to_checkpoint

    path = export_gguf(variants["attention"], tmp_path / "att.gguf", qtype="f32")  # deci
    (tmp_path / "o").mkdir()
    with pytest.raises(ShortrtError, match="GGUF architecture 'deci' cannot be read"):
        gguf_to_checkpoint(path, tmp_path / "o")
    # A llama file whose tensor list lacks one block's ffn_up: named, nothing converted.
    src = export_gguf(variants["dense"], tmp_path / "d.gguf", qtype="f32")
    reader = GGUFReader(src)
    w = GGUFWriter(tmp_path / "lying.gguf", "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        w.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name != "blk.2.ffn_up.weight":
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "o2").mkdir()
    with pytest.raises(ShortrtError, match=r"tensors do not match its metadata \(missing \['blk.2.ffn_up.weight'\]"):
        gguf_to_checkpoint(tmp_path / "lying.gguf", tmp_path / "o2")


@pytest.mark.slow
def test_default_gguf_reads_what_transformers_reads(tmp_path):
    from safetensors.torch import load_file

    from shortrt.checkpoint import default_gguf_path
    from shortrt.gguf_export import gguf_to_checkpoint

    gguf_to_checkpoint(default_gguf_path(), tmp_path)
    got = load_file(tmp_path / "model.safetensors")
    want = transformers_gguf_state(default_gguf_path())
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


_GGUF_PEAK = """
import sys
import gguf, transformers
from transformers import AutoConfig
from shortrt.gguf_export import gguf_to_checkpoint
path = sys.argv[1]
AutoConfig.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])  # metadata in both runs
if sys.argv[2] == "convert":
    gguf_to_checkpoint(path, __import__("pathlib").Path(sys.argv[3]))
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def test_gguf_source_memory_stays_flat_with_a_large_tensor(tmp_path):
    """Two 384 MiB (fp32) matrices stored as Q8_0 are read in pieces: the conversion's peak
    resident memory (VmHWM, the GGUF's mapped pages included) rises by less than two pieces over
    reading its metadata, never by the fp32 model (transformers' loading holds all of it)."""
    import subprocess
    import sys

    from shortrt.checkpoint import CHUNK_BYTES

    vocab, hidden = 98304, 1024
    src, _ = make_tiny(tmp_path / "wide", num_hidden_layers=2, tokenizer=True, vocab_size=vocab,
                       hidden_size=hidden, intermediate_size=64, num_attention_heads=16, num_key_value_heads=16,
                       head_dim=64)
    path = export_gguf(src, tmp_path / "wide.gguf", qtype="q8_0")

    def peak(*args):
        out = subprocess.run([sys.executable, "-c", _GGUF_PEAK, str(path), *args], check=True,
                             capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    (tmp_path / "read").mkdir()
    rise = peak("convert", str(tmp_path / "read")) - peak("metadata")
    # Pieces of a quarter of CHUNK_BYTES with gguf's temporaries, and the file's pages dropped as
    # they are read (without that the file's 215 MiB stayed resident: a rise of 466 MiB here).
    assert rise < 2 * CHUNK_BYTES + (32 << 20), f"peak rose by {rise / 2**20:.0f} MiB"
