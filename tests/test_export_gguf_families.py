"""`shortrt export --to gguf` of Qwen3, OLMo-2, Phi-3 and Gemma 3 text (issue #17), on tiny random checkpoints built
with transformers, dense and with layers removed.

Without llama.cpp (everywhere): the file's architecture (qwen3 / olmo2 / phi3 / gemma3), block count, every tensor
under the name llama.cpp's loader asks for (src/models/<arch>.cpp) with the checkpoint's values (f32: exact;
Gemma 3's norms stored as 1 + w in float32, its q_norm times the factor that turns llama.cpp's score scale into
query_pre_attn_scalar ** -0.5, within 1 float32 rounding), the family's keys (Phi-3's rope dimension count,
Gemma 3's per-block sliding pattern, window, local RoPE base, soft-cap); the refusals; and the file read back
by shortrt.load(x.gguf): the checkpoint's tensors (exact; Gemma 3's norms within 2.4e-7, q_norm within 1e-6
relative: the float32 roundings of (1 + w) - 1 and of the factor) and its fp32 logits within 1e-5.

With llama.cpp ($SHORTRT_LLAMA_CPP_BIN, else skipped with the reason): the f32 file in llama-server (f32 KV
cache) gives transformers' greedy tokens, 32 after a 36-token prompt (Gemma 3's window is 8: most positions
attend past it), and at every position the server reports, its top-8 next-token log-probabilities within
LOGPROB_TOL of transformers' log-softmax (llama-server masks the end-of-generation token, so does the
reference). The bounds: a tiny Llama export measures 2.1e-3 by the same comparison (llama.cpp's own f32
arithmetic on these random models); Qwen3 (head_dim 32, apart from hidden / heads = 16) is held to
1e-2 as well; OLMo-2 measures up to 3.4e-3, Phi-3 2.4e-3 (bound 1e-2), Gemma 3 up to
2.1e-2 (bound 5e-2: ggml's GELU reads a table indexed by the fp16 rounding of its input). Gemma 3 exported
without the q_norm factor errs by 1.1.

Checkpoint directories avoid "phi3" in their names: llama.cpp keys Phi-3 token fix-ups on general.name and
needs <unk> and <|endoftext|> tokens that the tiny tokenizer does not have.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import shortrt  # noqa: E402
from runtime_models import IDS_SHORT, make_tiny, rel_err  # noqa: E402
from shortrt.gguf_export import ExportError, export_gguf, gemma3_q_norm_factor, gguf_name  # noqa: E402
from shortrt.layermap import LayerMap  # noqa: E402
from shortrt.reference import ReferenceModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_tools as lc  # noqa: E402

Q = gguf.GGMLQuantizationType
GEMMA = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
             head_dim=32, sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24,
             rope_theta=10000.0, rope_local_base_freq=100.0, final_logit_softcapping=3.0)
FAMILIES = {"qwen3": {"head_dim": 32}, "olmo2": {}, "phi3": {"partial_rotary_factor": 0.5}, "gemma3": GEMMA}
ARCH = {"qwen3": "qwen3", "olmo2": "olmo2", "phi3": "phi3", "gemma3": "gemma3"}
REMOVED = [2, 3]  # Gemma 3's S S F S S F becomes S S S F: no period describes it
LOGPROB_TOL = {"qwen3": 1e-2, "olmo2": 1e-2, "phi3": 1e-2, "gemma3": 5e-2}
PROMPT = IDS_SHORT * 3


def build(root: Path) -> dict:
    """(family, "dense" | "pruned" | "attention") -> checkpoint directory."""
    out = {}
    for fam, extra in FAMILIES.items():
        dense, _ = make_tiny(root / f"{fam[:2]}-dense", fam, num_hidden_layers=6, tokenizer=True, **extra)
        if fam == "gemma3":  # the tiny BPE, not the Gemma tokenizer class model_type would pick
            (dense / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        out[fam, "dense"] = dense
        out[fam, "pruned"] = shortrt.prune(dense, LayerMap.from_removed(6, REMOVED, method="shortgpt"),
                                           root / f"{fam[:2]}-pruned").path
        out[fam, "attention"] = shortrt.prune(dense, LayerMap.from_removed_attention(6, [1, 4], method="attention"),
                                              root / f"{fam[:2]}-attention").path
    scaled, _ = make_tiny(root / "ge-linear", "gemma3", num_hidden_layers=6, tokenizer=True,
                          **{**GEMMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})  # full layers only
    (scaled / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    out["gemma3", "linear-rope"] = scaled
    full, _ = make_tiny(root / "p3full-dense", "phi3", num_hidden_layers=6, tokenizer=True)  # whole heads rotated
    out["phi3full", "attention"] = shortrt.prune(full, LayerMap.from_removed_attention(6, [1, 4], method="attention"),
                                                 root / "p3full-attention").path
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build(tmp_path_factory.mktemp("families"))


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def stored(t) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(s) for s in t.shape[::-1]))


CASES = [(fam, which) for fam in FAMILIES for which in ("dense", "pruned")]
MORE = CASES + [("gemma3", "linear-rope")]  # Gemma 3's full layers' RoPE scaled, its sliding ones not


@pytest.mark.parametrize("fam,which", CASES, ids=[f"{f}-{w}" for f, w in CASES])
def test_the_file_is_laid_out_as_llama_cpp_loads_it(ckpts, fam, which, tmp_path):
    m = shortrt.load(ckpts[fam, which])
    cfg = m.model_config
    k = len(m.layer_map.layers)
    r = gguf.GGUFReader(str(export_gguf(m.path, tmp_path / "x.gguf", qtype="f32")))
    f, arch = fields(r), ARCH[fam]
    assert f["general.architecture"] == arch and f[f"{arch}.block_count"] == k == (6 if which == "dense" else 4)
    assert (f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]) == (cfg.n_heads, cfg.n_kv_heads)
    assert f[f"{arch}.rope.dimension_count"] == (8 if fam == "phi3" else cfg.head_dim)  # Phi-3: 0.5 of 16
    tensors = {t.name: t for t in r.tensors}
    per_block = {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")}
    assert per_block == {
        "qwen3": {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "attn_q_norm.weight", "attn_k_norm.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                  "ffn_down.weight"},
        "olmo2": {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight",
                  "attn_k_norm.weight", "post_attention_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                  "ffn_down.weight", "post_ffw_norm.weight"},
        "phi3": {"attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                 "ffn_down.weight"},
        "gemma3": {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "ffn_norm.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"}}[fam]
    values = m.read_tensors()
    expected = {gguf_name(n, cfg): n for n in values}
    assert set(tensors) == set(expected) and not any(n.startswith(f"blk.{k}.") for n in tensors)
    factor = gemma3_q_norm_factor(cfg, k) if fam == "gemma3" else 1.0
    for g, name in expected.items():
        want, got = values[name].numpy(), stored(tensors[g])
        assert tensors[g].tensor_type == Q.F32
        if fam == "gemma3" and g.endswith("norm.weight"):
            want = np.float32(1) + want
            if g.endswith("attn_q_norm.weight"):
                np.testing.assert_allclose(got, want * factor, rtol=1.2e-7, err_msg=g)
                continue
        np.testing.assert_array_equal(got, want, err_msg=g)
    if fam == "phi3":  # the fused matrices as stored: q, k, v rows; gate, up rows
        assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 64 + 2 * 32]
        assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [64, 2 * 96]
    if fam == "gemma3":
        kinds = [cfg.is_sliding(i) for i in range(k)]
        assert kinds == ([True, True, False, True, True, False] if which == "dense" else [True, True, True, False])
        assert f["gemma3.attention.sliding_window_pattern"] == kinds
        assert f["gemma3.attention.sliding_window"] == 8
        assert f["gemma3.rope.freq_base_swa"] == 100.0 and f["gemma3.rope.freq_base"] == 10000.0
        assert f["gemma3.final_logit_softcapping"] == 3.0
        assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
        # llama.cpp scales scores by 1/sqrt(head_dim) = 1/sqrt(32); the model by 24 ** -0.5
        assert factor == pytest.approx((32 / 24) ** 0.5, rel=1e-6)


def test_gemma3_with_only_full_layers_left_has_no_window(ckpts, tmp_path, monkeypatch):
    """Keeping only Gemma 3's full-attention layers (2 and 5): no window key, so llama.cpp builds no
    sliding-window cache; read back, every layer is full_attention."""
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    full = shortrt.prune(ckpts["gemma3", "dense"], LayerMap.from_removed(6, [0, 1, 3, 4]), tmp_path / "full").path
    out = export_gguf(full, tmp_path / "f.gguf", qtype="f32")
    f = fields(gguf.GGUFReader(str(out)))
    assert f["gemma3.block_count"] == 2
    assert not {"gemma3.attention.sliding_window", "gemma3.attention.sliding_window_pattern"} & set(f)
    assert shortrt.load(out, progress=False).model_config.layer_types == ("full_attention",) * 2
    if lc.binary("llama-server") is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, suppress_tokens=[2])[0, len(PROMPT):].tolist()
        with lc.server(out) as greedy:
            assert greedy(PROMPT, 16) == ref


def test_olmo2_tied_embeddings_get_an_output_tensor(tmp_path):
    """llama.cpp's olmo2 requires output.weight (it does not fall back to token_embd)."""
    path, _ = make_tiny(tmp_path / "ol", "olmo2", tokenizer=True, tie_word_embeddings=True)
    r = gguf.GGUFReader(str(export_gguf(path, tmp_path / "o.gguf", qtype="f16")))
    t = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(stored(t["output.weight"]), stored(t["token_embd.weight"]))


@pytest.mark.parametrize("fam,which", MORE, ids=[f"{f}-{w}" for f, w in MORE])
def test_shortrt_reads_the_file_back(ckpts, fam, which, tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    src = shortrt.load(ckpts[fam, which])
    back = shortrt.load(export_gguf(src.path, tmp_path / "x.gguf", qtype="f32"), progress=False)
    a, b = src.model_config, back.model_config
    for field in ("architecture", "hidden", "intermediate", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "rotary_dim", "layer_types", "sliding_window", "rope_theta", "rope_local_theta", "final_softcap",
                  "rope_type", "rope_factor",
                  "attn_scale", "embed_scale", "tie_embeddings", "qk_norm_whole", "post_norm", "sandwich_norm"):
        assert getattr(b, field) == getattr(a, field), field
    want, got = src.read_tensors(), back.read_tensors()
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        if fam == "gemma3" and name.endswith("q_norm.weight"):
            np.testing.assert_allclose(got[name].numpy(), w.numpy(), rtol=1e-6, atol=2.4e-7, err_msg=name)
        elif fam == "gemma3" and name.endswith("norm.weight"):
            np.testing.assert_allclose(got[name].numpy(), w.numpy(), rtol=0, atol=2.4e-7, err_msg=name)
        else:
            assert torch.equal(got[name], w), name
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert rel_err(ReferenceModel.load(back).forward(ids)[0].numpy(),
                       ReferenceModel.load(src).forward(ids)[0].numpy()) < 1e-5
    assert back.tokenizer()("the lazy dog")["input_ids"] == src.tokenizer()("the lazy dog")["input_ids"]


def test_a_gemma3_gguf_source_prunes_to_its_blocks_as_stored(ckpts, tmp_path, monkeypatch):
    """export -> shortrt.load(x.gguf) -> prune -> export --type source: the kept blocks' tensors copied
    as stored (norms still 1 + w), the per-block sliding pattern trimmed with them."""
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    src = export_gguf(ckpts["gemma3", "dense"], tmp_path / "g.gguf", qtype="q8_0")
    pruned = shortrt.prune(shortrt.load(src, progress=False), LayerMap.from_removed(6, REMOVED), tmp_path / "p")
    out = export_gguf(pruned.path, tmp_path / "p.gguf", qtype="source")
    before = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    r = gguf.GGUFReader(str(out))
    assert fields(r)["gemma3.attention.sliding_window_pattern"] == [True, True, True, False]
    kept = [0, 1, 4, 5]
    for t in r.tensors:
        parts = t.name.split(".", 2)
        old = t.name if parts[0] != "blk" else f"blk.{kept[int(parts[1])]}.{parts[2]}"
        assert t.tensor_type == before[old].tensor_type
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(before[old].data))


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_attention_less_layers_are_refused_with_the_reason(ckpts, fam, tmp_path):
    why = {"qwen3": "llama.cpp's qwen3 architecture needs attention in every block, and its deci architecture .* has "
                    "no q/k norm",
           "olmo2": "llama.cpp's olmo2 architecture needs attention in every block, and its deci architecture .* has "
                    "no norms after the sublayers",
           "phi3": "llama.cpp holds in its deci architecture only, and deci rotates whole heads .* not the 8 of 16 dims",
           "gemma3": "llama.cpp's gemma3 architecture needs attention in every block, and its deci architecture .* "
                     "has no sandwich norms"}[fam]
    with pytest.raises(ExportError, match=rf"layers \[1, 4\] have no attention(;|, which) {why}"):
        export_gguf(ckpts[fam, "attention"], tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_attention_less_phi3_goes_to_deci_with_its_fused_matrices_split(ckpts, tmp_path):
    """A Phi-3 rotating whole heads (Phi-3 mini / medium do) with attention removed: deci, whose blocks read
    attn_q / attn_k / attn_v (rows of qkv_proj; q and k in deci's pairwise RoPE order) and ffn_gate / ffn_up
    (the halves of gate_up_proj)."""
    from shortrt.gguf_export import rope_permute

    m = shortrt.load(ckpts["phi3full", "attention"])
    r = gguf.GGUFReader(str(export_gguf(m.path, tmp_path / "d.gguf", qtype="f32")))
    f = fields(r)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [4, 0, 4, 4, 0, 4]
    tensors = {t.name: stored(t) for t in r.tensors}
    assert {n.split(".", 2)[2] for n in tensors if n.startswith("blk.1.")} == {"ffn_norm.weight", "ffn_gate.weight",
                                                                             "ffn_up.weight", "ffn_down.weight"}
    v = m.read_tensors()
    qkv, gate_up = v["model.layers.0.self_attn.qkv_proj.weight"].numpy(), v["model.layers.0.mlp.gate_up_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], rope_permute(qkv[:64], 4))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], rope_permute(qkv[64:96], 2))
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"], qkv[96:])
    np.testing.assert_array_equal(tensors["blk.0.ffn_gate.weight"], gate_up[:96])
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"], gate_up[96:])
    assert "blk.0.attn_qkv.weight" not in tensors


def test_shapes_llama_cpp_cannot_hold_are_refused(tmp_path):
    olmo, _ = make_tiny(tmp_path / "ol", "olmo2", tokenizer=True, head_dim=32)  # 4 heads x 32 != hidden 64
    with pytest.raises(ExportError, match="head_dim 32 x 4 heads != hidden_size 64"):
        export_gguf(olmo, tmp_path / "o.gguf")
    phi, _ = make_tiny(tmp_path / "p3", "phi3", tokenizer=True, sliding_window=16)
    with pytest.raises(ExportError, match="sliding window of 16 tokens .*phi3.cpp turns Phi-3's window off"):
        export_gguf(phi, tmp_path / "p.gguf")
    long = dict(max_position_embeddings=64, original_max_position_embeddings=16,
                rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    phi_long, _ = make_tiny(tmp_path / "pl", "phi3", tokenizer=True, **long)
    with pytest.raises(ExportError, match="rope scaling 'longrope' .* not written by the GGUF export"):
        export_gguf(phi_long, tmp_path / "pl.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ol", "p3", "pl"]


# ---- in llama.cpp ------------------------------------------------------------------------------

def token_bytes(tokenizer_json: Path):
    """token id -> its bytes under the byte-level BPE of tokenizer_json (special tokens: b"")."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inv = {c: b for b, c in bytes_to_unicode().items()}
    doc = json.loads(tokenizer_json.read_text())
    table = {i: bytes(inv[c] for c in t) for t, i in doc["model"]["vocab"].items()}
    for a in doc["added_tokens"]:
        table[a["id"]] = b"" if a.get("special") else a["content"].encode()
    return lambda t: table.get(t, b"")


@pytest.mark.skipif(lc.binary("llama-server") is None, reason=lc.skip_reason("llama-server"))
@pytest.mark.parametrize("fam,which", MORE, ids=[f"{f}-{w}" for f, w in MORE])
def test_llama_cpp_runs_the_export_as_transformers_does(ckpts, fam, which, tmp_path):
    from transformers import AutoModelForCausalLM

    path = ckpts[fam, which]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # llama-server is asked to ignore end-of-generation tokens, which it does by masking them out:
    # transformers masks the same one (the model's eos, token 2; the file's only end-of-generation token)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, suppress_tokens=[2])[0, len(PROMPT):].tolist()
    out = export_gguf(path, tmp_path / f"{fam}-{which}.gguf", qtype="f32")
    with lc.server(out) as server:
        got, steps = server.logprobs(PROMPT, 32, token_bytes(path / "tokenizer.json"))
    assert got == ref, f"llama.cpp {got}\ntransformers {ref}"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPT + got])).logits[0].double(), -1).numpy()
    reported = [(k, s) for k, s in enumerate(steps) if s]
    assert len(reported) >= 4
    err = max(abs(logp[len(PROMPT) - 1 + k, t] - v) for k, s in reported for t, v in s.items())
    assert err <= LOGPROB_TOL[fam], f"max |log-prob difference| {err} over {len(reported)} positions"


@pytest.mark.skipif(lc.binary("llama-server") is None, reason=lc.skip_reason("llama-server"))
def test_llama_cpp_runs_attention_less_phi3_as_shortrt_does(ckpts, tmp_path):
    """transformers has no attention-less layer: the reference is shortrt's (shortrt.reference, fp32)."""
    path = ckpts["phi3full", "attention"]
    ref_model = ReferenceModel.load(path)
    ref = []
    with torch.no_grad():
        for _ in range(32):
            z = ref_model.forward(torch.tensor([PROMPT + ref]))[0, -1]
            z[2] = -float("inf")  # llama-server masks the end-of-generation token (ignore_eos)
            ref.append(int(z.argmax()))
    out = export_gguf(path, tmp_path / "deci.gguf", qtype="f32")
    with lc.server(out) as server:
        got, steps = server.logprobs(PROMPT, 32, token_bytes(path / "tokenizer.json"))
    assert got == ref, f"llama.cpp {got}\nshortrt {ref}"
    with torch.no_grad():
        logp = torch.log_softmax(ref_model.forward(torch.tensor([PROMPT + got]))[0].double(), -1).numpy()
    reported = [(k, s) for k, s in enumerate(steps) if s]
    err = max(abs(logp[len(PROMPT) - 1 + k, t] - v) for k, s in reported for t, v in s.items())
    assert len(reported) >= 4 and err <= LOGPROB_TOL["phi3"], err


@pytest.mark.skipif(lc.binary("llama-server") is None, reason=lc.skip_reason("llama-server"))
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_loads_every_tensor_type(ckpts, qtype, tmp_path):
    """Each family's pruned export at each encoding loads and generates (its quality is the format's)."""
    for fam in FAMILIES:
        out = export_gguf(ckpts[fam, "pruned"], tmp_path / f"{fam}.{qtype}.gguf", qtype=qtype)
        with lc.server(out) as greedy:
            assert len(greedy(PROMPT, 8)) == 8
