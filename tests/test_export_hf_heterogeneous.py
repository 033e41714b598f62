"""`shortrt export --to hf-heterogeneous` (shortrt.decilm_export), checked without vLLM.

The written directory is read back by code written here from the published format, not by the
writer's: a small parser of config.json's block_configs with the rules vLLM's nemotron_nas
(00bd1493b3e8) and llama.cpp's DeciModel converter apply (every key they index present, KV heads =
heads / n_heads_in_group, MLP width = int(2 * ffn_mult * hidden / 3) rounded up to a multiple of
256, the first ffn_mult a float), and a minimal DeciLM forward in torch (each block: x += attn(norm(x))
unless attention is a no-op, x += mlp(norm(x)) unless the ffn is a no-op). That forward is first
held to transformers' Llama on a dense export (1e-5), then the exports of attention-less
checkpoints to shortrt's fp32 runtime (1e-4 of the largest logit). transformers 5.24 has no
built-in DeciLM, so the shipped configuration_decilm.py is loaded with trust_remote_code.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, tensors_of
from runtime_models import IDS_SHORT, hf_logits, make_tiny, prose, rel_err, write_pruned

import shortrt
from shortrt.decilm_export import (HeterogeneousExportError, export_hf_heterogeneous, ffn_mult_for,
                                   intermediate_size_from_ffn_mult)
from shortrt.layermap import LayerMap

WIDE = dict(num_hidden_layers=6, intermediate_size=256, tokenizer=True)  # 256: a width the format can express
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


# ---------------------------------------------------------------- the format, as published

def published_width(ffn_mult: float, hidden: int) -> int:
    """vLLM's / llama.cpp's _ffn_mult_to_intermediate_size, restated."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def parse_blocks(config: dict) -> list[dict]:
    """Per block: attention (bool), kv heads, mlp (bool), MLP width, as a DeciLM reader derives them."""
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert len(blocks) == config["num_hidden_layers"]
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    out = []
    for b in blocks:
        att, ffn = b["attention"], b["ffn"]
        # llama.cpp's converter indexes these keys on every block
        assert {"no_op", "replace_with_linear", "n_heads_in_group"} <= set(att)
        assert {"no_op", "replace_with_linear", "ffn_mult"} <= set(ffn)
        assert att["replace_with_linear"] is False and ffn["replace_with_linear"] is False
        has_att, has_mlp = not att["no_op"], not ffn["no_op"]
        assert (att["n_heads_in_group"] is not None) == has_att
        assert (ffn["ffn_mult"] is not None) == has_mlp
        out.append({"attention": has_att, "kv": heads // att["n_heads_in_group"] if has_att else 0,
                    "mlp": has_mlp, "width": published_width(ffn["ffn_mult"], hidden) if has_mlp else 0})
    assert isinstance(blocks[0]["ffn"]["ffn_mult"], float)  # llama.cpp asserts this on block 0
    return out


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def decilm_forward(path, ids) -> np.ndarray:
    """Logits of a DeciLM checkpoint (default RoPE) computed from its config.json and tensors."""
    c = json.loads((path / "config.json").read_text())
    w = {k: v.double() for k, v in tensors_of(path).items()}
    blocks = parse_blocks(c)
    h, n_heads, eps = c["hidden_size"], c["num_attention_heads"], c["rms_norm_eps"]
    hd = h // n_heads
    t = len(ids)
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [heads, t, hd], rotate-half
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
    for i, b in enumerate(blocks):
        p = f"model.layers.{i}."
        if b["attention"]:
            a = rms(x, w[p + "input_layernorm.weight"], eps)
            q = rope((a @ w[p + "self_attn.q_proj.weight"].T).view(t, n_heads, hd).transpose(0, 1))
            k = rope((a @ w[p + "self_attn.k_proj.weight"].T).view(t, b["kv"], hd).transpose(0, 1))
            v = (a @ w[p + "self_attn.v_proj.weight"].T).view(t, b["kv"], hd).transpose(0, 1)
            k, v = k.repeat_interleave(n_heads // b["kv"], 0), v.repeat_interleave(n_heads // b["kv"], 0)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
            x = x + att.transpose(0, 1).reshape(t, h) @ w[p + "self_attn.o_proj.weight"].T
        if b["mlp"]:
            m = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return (x @ head.T).float().numpy()


def check_against_tensors(path) -> list[dict]:
    """The parsed blocks agree with the tensors present: no-op sub-blocks have none, present ones
    have the shapes the block's kv heads and MLP width imply."""
    c = json.loads((path / "config.json").read_text())
    blocks = parse_blocks(c)
    t = tensors_of(path)
    hd = c["hidden_size"] // c["num_attention_heads"]
    for i, b in enumerate(blocks):
        p = f"model.layers.{i}."
        attention = {k for k in t if k.startswith(p + "self_attn.") or k == p + "input_layernorm.weight"}
        mlp = {k for k in t if k.startswith(p + "mlp.") or k == p + "post_attention_layernorm.weight"}
        assert bool(attention) == b["attention"], i
        assert bool(mlp) == b["mlp"], i
        if b["attention"]:
            assert t[p + "self_attn.k_proj.weight"].shape[0] == b["kv"] * hd
            assert t[p + "self_attn.q_proj.weight"].shape[0] == c["num_attention_heads"] * hd
        if b["mlp"]:
            assert t[p + "mlp.gate_proj.weight"].shape[0] == b["width"]
            assert t[p + "mlp.down_proj.weight"].shape[1] == b["width"]
    assert not [k for k in t if k.startswith("model.layers.") and int(k.split(".")[2]) >= len(blocks)]
    return blocks


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from shortrt.replacement import replace

    root = tmp_path_factory.mktemp("hfdeci")
    dense, model = make_tiny(root / "dense", **WIDE)
    (dense / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    out = {"dense": (dense, model)}
    out["attention"] = shortrt.prune(dense, LayerMap.from_removed_attention(6, [2, 4], method="attention"),
                                     root / "attention").path
    out["shortgpt"] = shortrt.prune(dense, LayerMap.from_removed(6, [1, 4], method="shortgpt"), root / "sg").path
    out["span+mlp"] = replace(dense, LayerMap.from_removed(6, [2, 3, 4], method="span"), root / "span+mlp",
                              kind="mlp", texts=prose(), n_tokens=2048, seq_len=64, steps=3, progress=False).path
    out["manual"] = write_pruned(dense, root / "manual", keep=[0, 1, 3, 5], flags={1: (False, True), 3: (False, True)})
    return out


def export(src, tmp_path, name="deci"):
    return export_hf_heterogeneous(src, tmp_path / name)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("intermediate,hidden", [(1536, 576), (4864, 896), (14336, 4096), (8192, 2048),
                                                 (8192, 3072), (28672, 8192), (256, 64), (512, 64)])
def test_ffn_mult_reproduces_the_width(intermediate, hidden):
    """SmolLM2, Qwen2.5-0.5B, Llama 3 8B / 3.2 1B and 3B / 3 70B and the tiny test shapes."""
    m = ffn_mult_for(intermediate, hidden)
    assert isinstance(m, float)
    assert published_width(m, hidden) == intermediate
    assert published_width(round(m, 6), hidden) == intermediate  # NVIDIA's block_config rounds to 6 decimals
    f32 = np.float32(m)
    assert published_width(float(f32), hidden) == intermediate
    assert intermediate_size_from_ffn_mult(m, hidden) == intermediate
    assert len(repr(m)) <= 10  # a short decimal, not 8.142857142857142


def test_known_ffn_mults():
    assert ffn_mult_for(14336, 4096) == 5.25 and ffn_mult_for(1536, 576) == 4.0
    assert ffn_mult_for(4864, 896) == 8.142857  # 3 * 4864 / (2 * 896) to 6 decimals


@pytest.mark.parametrize("intermediate", [96, 1000, 4865])
def test_width_no_ffn_mult_gives_is_refused(intermediate):
    with pytest.raises(HeterogeneousExportError, match=f"intermediate_size {intermediate} cannot be written.*"
                                                       "multiples of 256"):
        ffn_mult_for(intermediate, 64)


@pytest.mark.parametrize("name", ["dense", "attention", "shortgpt", "span+mlp", "manual"])
def test_config_and_tensors_agree(variants, name, tmp_path):
    src = variants[name][0] if name == "dense" else variants[name]
    out = export(src, tmp_path)
    blocks = check_against_tensors(out)
    m = shortrt.load(src)
    assert [b["attention"] for b in blocks] == [e.attention for e in m.layer_map.layers]
    assert all(b["mlp"] for b in blocks)
    cfg = m.model_config
    assert all(b["kv"] == cfg.n_kv_heads for b in blocks if b["attention"])
    assert all(b["width"] == cfg.intermediate for b in blocks)
    # tensors copied as stored: same names (no lm_head: tied), bytes equal
    mine, theirs = tensors_of(out), tensors_of(src)
    assert set(mine) == {k for k in theirs if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine)
    # tokenizer and chat template travel with it; no shortrt.json (shortrt cannot load a DeciLM dir)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    if (src / "tokenizer_config.json").exists():
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert not (out / "shortrt.json").exists()
    assert json.loads((out / "shortrt_export.json").read_text())["layer_map"] == m.layer_map.to_json()


def test_remote_config_loads_in_transformers(variants, tmp_path):
    """The shipped configuration_decilm.py, through AutoConfig (trust_remote_code), gives the
    attributes vLLM's nemotron_nas reads, and serializes back to the same block_configs."""
    from transformers import AutoConfig

    out = export(variants["attention"], tmp_path)
    c = AutoConfig.from_pretrained(out, trust_remote_code=True)
    raw = json.loads((out / "config.json").read_text())
    assert c.model_type == "nemotron-nas" and len(c.block_configs) == c.num_hidden_layers == 6
    for b, r in zip(c.block_configs, raw["block_configs"]):
        assert b.attention.no_op is r["attention"]["no_op"] and b.ffn.no_op is False
        assert hasattr(b.ffn, "ffn_mult") and b.ffn.ffn_mult == r["ffn"]["ffn_mult"]  # vLLM's branch
        if not b.attention.no_op:
            assert c.num_attention_heads // b.attention.n_heads_in_group == 2
    assert json.loads(c.to_json_string())["block_configs"] == raw["block_configs"]
    assert [b.attention.no_op for b in c.block_configs] == [False, False, True, False, True, False]


def test_reference_forward_is_llama_on_a_dense_export(variants, tmp_path):
    """The test's DeciLM forward on the dense export equals transformers' Llama on the source."""
    src, model = variants["dense"]
    out = export(src, tmp_path)
    assert rel_err(decilm_forward(out, IDS_SHORT), hf_logits(model, IDS_SHORT)) <= 1e-5


@pytest.mark.parametrize("name", ["attention", "shortgpt", "span+mlp", "manual"])
def test_logits_match_shortrt(variants, name, tmp_path):
    """The DeciLM reading of the export gives shortrt fp32's logits (within 1e-4 of the largest)."""
    src = variants[name]
    out = export(src, tmp_path)
    ref = shortrt.Engine(src, dtype="fp32").logits(IDS_SHORT)
    assert rel_err(decilm_forward(out, IDS_SHORT), ref) <= 1e-4


# ---------------------------------------------------------------- refusals and overwriting

def test_qwen2_and_qwen3_are_refused(tmp_path):
    qwen2, _ = make_tiny(tmp_path / "q2", arch="qwen2", **WIDE)
    with pytest.raises(HeterogeneousExportError, match="Qwen2ForCausalLM cannot be exported to hf-heterogeneous: "
                                                       "DeciLM blocks have no q/k/v bias"):
        export(qwen2, tmp_path)
    qwen3, _ = make_tiny(tmp_path / "q3", arch="qwen3", head_dim=16, **WIDE)
    with pytest.raises(HeterogeneousExportError, match="Qwen3ForCausalLM .* no q/k RMSNorm"):
        export(qwen3, tmp_path)
    assert not (tmp_path / "deci").exists()


@pytest.mark.parametrize("flags,match", [({0: (False, True)}, "layer 0 has no attention"),
                                         ({2: (True, False)}, r"layers \[2\] keep attention but have no MLP")])
def test_layouts_the_readers_mishandle_are_refused(variants, tmp_path, flags, match):
    src = write_pruned(variants["dense"][0], tmp_path / "odd", keep=[0, 1, 2, 3], flags=flags)
    with pytest.raises(HeterogeneousExportError, match=match):
        export(src, tmp_path)
    assert not (tmp_path / "deci").exists()


def test_other_inexpressible_models_are_refused(tmp_path):
    narrow, _ = make_tiny(tmp_path / "narrow", num_hidden_layers=2)  # intermediate 96
    with pytest.raises(HeterogeneousExportError, match="intermediate_size 96"):
        export(narrow, tmp_path)
    window, _ = make_tiny(tmp_path / "window", arch="mistral", sliding_window=64, **WIDE)
    with pytest.raises(HeterogeneousExportError, match="sliding window of 64 tokens"):
        export(window, tmp_path)
    wide_heads, _ = make_tiny(tmp_path / "hd", head_dim=32, **WIDE)
    with pytest.raises(HeterogeneousExportError, match="head_dim 32 is not hidden_size / num_attention_heads"):
        export(wide_heads, tmp_path)
    assert not (tmp_path / "deci").exists()


def test_cli_overwrite_needs_force(variants, tmp_path, capsys):
    src, out = variants["attention"], tmp_path / "deci"
    rc, stdout, _ = run_cli(["export", src, "--to", "hf-heterogeneous", "--out", out, "--no-progress"], capsys)
    assert rc == 0 and "DeciLMForCausalLM" in stdout and "4 with attention" in stdout
    before = (out / "config.json").read_bytes()
    (out / "config.json").write_text("{}")  # so that a refused second export visibly changed nothing
    rc, _, err = run_cli(["export", src, "--to", "hf-heterogeneous", "--out", out, "--no-progress"], capsys)
    assert rc == 1 and "pass --force" in err and (out / "config.json").read_text() == "{}"
    rc, _, _ = run_cli(["export", src, "--to", "hf-heterogeneous", "--out", out, "--force", "--no-progress"], capsys)
    assert rc == 0 and (out / "config.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    rc, _, err = run_cli(["export", src, "--to", "hf-heterogeneous", "--out", src, "--force"], capsys)
    assert rc == 1 and "would overwrite the source checkpoint" in err
    assert shortrt.load(src).check()  # the source is intact


def test_cli_refuses_type_and_names_the_reason(variants, tmp_path, capsys):
    rc, _, err = run_cli(["export", variants["attention"], "--to", "hf-heterogeneous", "--type", "q8_0",
                          "--out", tmp_path / "x"], capsys)
    assert rc == 1 and "--type q8_0 applies to --to gguf" in err
    qwen2, _ = make_tiny(tmp_path / "q2", arch="qwen2", **WIDE)
    rc, _, err = run_cli(["export", qwen2, "--to", "hf-heterogeneous", "--out", tmp_path / "y"], capsys)
    assert rc == 1 and "no q/k/v bias" in err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_scaling_travels(tmp_path, scaling):
    """transformers reads the export's RoPE as the source's; llama.cpp's converter finds Llama 3's
    original context at the top level, where it looks for it."""
    from transformers import AutoConfig

    src, _ = make_tiny(tmp_path / "src", rope_scaling=scaling, **WIDE)
    out = export(src, tmp_path)
    mine = AutoConfig.from_pretrained(out, trust_remote_code=True).rope_parameters
    assert mine == AutoConfig.from_pretrained(src).rope_parameters
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == scaling["rope_type"]
    if scaling["rope_type"] == "llama3":
        assert raw["original_max_position_embeddings"] == 64
