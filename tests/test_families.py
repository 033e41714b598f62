"""OLMo-2 and Phi-3 through the pipeline (issue #17), on tiny random checkpoints built with transformers.

OLMo-2 (Olmo2ForCausalLM): no input norms; post_attention_layernorm / post_feedforward_layernorm norm each
sublayer's output before the residual add; q_norm / k_norm are RMSNorms over the whole q [n_heads*head_dim]
and k [n_kv_heads*head_dim] projections. Phi-3 (Phi3ForCausalLM): fused self_attn.qkv_proj and
mlp.gate_up_proj tensors (the runtime reads them as its fused matrices), partial_rotary_factor.

Tolerance: max |logit difference| / max |reference logit| <= 1e-4 (fp32), as tests/test_runtime_logits.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runtime_models import hf_logits, make_tiny, rel_err
from shortrt import _C, calibrate, checkpoint, prune, select
from shortrt.engine import Engine
from shortrt.errors import CheckpointError
from shortrt.layer_plan import load_for_plan, plan_logits
from shortrt.reference import ReferenceModel

TOL = 1e-4
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4]
TEXTS = [" ".join(["Once upon a time there was a little model that ran on a lean runtime."] * 8)]

VARIANTS = [
    ("olmo2", {}),
    ("olmo2", {"head_dim": 32}),                    # q/k norm widths follow n_heads*head_dim, not hidden
    ("phi3", {}),
    ("phi3", {"partial_rotary_factor": 0.5}),       # RoPE on the first 8 of 16 dims of each head
    ("phi3", {"tie_word_embeddings": True}),
]


def hf_greedy(model, prompt, n=16, use_cache=True):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=use_cache)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,extra", VARIANTS, ids=[f"{a}-{'-'.join(e) or 'plain'}" for a, e in VARIANTS])
def test_fp32_logits_and_greedy_tokens_match_transformers(tmp_path, arch, extra):
    path, model = make_tiny(tmp_path / arch, arch, **extra)
    ref = hf_logits(model, IDS)
    eng = Engine(path, threads=2)
    assert rel_err(eng.logits(IDS), ref) <= TOL
    assert rel_err(eng.logits(IDS, chunk=1), ref) <= TOL  # token by token through the KV cache
    assert rel_err(ReferenceModel.load(path)(torch.tensor([IDS]))[0].numpy(), ref) <= TOL
    assert eng.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == hf_greedy(model, IDS[:5])


def test_partial_rotary_factor_is_read_by_both_readers(tmp_path):
    path, model = make_tiny(tmp_path / "p", "phi3", partial_rotary_factor=0.5)
    assert checkpoint.load(path).model_config.rotary_dim == 8
    # The runtime must rotate only those 8 dims: the same weights with full RoPE give other logits.
    doc = json.loads((path / "config.json").read_text())
    doc.pop("partial_rotary_factor")
    doc["rope_parameters"]["partial_rotary_factor"] = 1.0
    (path / "config.json").write_text(json.dumps(doc))
    assert rel_err(Engine(path, threads=2).logits(IDS), hf_logits(model, IDS)) > 1e-2


# Measured on these checkpoints (rel_err against the fp32 engine): bf16 0.010 / 0.006, int8 0.036 / 0.032
# (OLMo-2 / Phi-3). int4 on the model's own weights is dominated by the 4-bit rounding a random model
# amplifies (0.47 / 0.29); on weights already on the int4 grid it errs only by the int8 activations.
@pytest.mark.parametrize("arch", ["olmo2", "phi3"])
def test_weight_formats_stay_close_to_fp32(tmp_path, arch):
    from safetensors.numpy import load_file as load_np, save_file as save_np

    path, _ = make_tiny(tmp_path / arch, arch)
    ref = Engine(path, threads=2).logits(IDS)
    for dtype, bound in (("bf16", 0.02), ("int8", 0.06)):
        assert 0 < rel_err(Engine(path, dtype=dtype, threads=2).logits(IDS), ref) <= bound, dtype
    tensors = load_np(str(path / "model.safetensors"))
    for name, t in tensors.items():
        if t.ndim == 2:
            tensors[name] = _C.dequantize_q4(*_C.quantize_q4(t.ravel())).reshape(t.shape)
    save_np(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ref = Engine(path, threads=2).logits(IDS)
    int4 = rel_err(Engine(path, dtype="int4", lm_head_dtype="same", threads=2).logits(IDS), ref)
    int8 = rel_err(Engine(path, dtype="int8", threads=2).logits(IDS), ref)
    assert 0 < int4 <= 0.06 and int4 <= int8 * 1.1


def hand_scores(path, ids):
    """Per layer (bi, attn_bi, mlp_bi) from shortrt.reference's blocks: each sublayer compared on the
    residual stream before and after it (OLMo-2: m = h + post_attention_layernorm(attn(h)))."""
    from shortrt.reference import rope_inv_freq

    ref = ReferenceModel.load(path)
    t = ids.shape[-1]
    inv = rope_inv_freq(ref.cfg, seq_len=t)  # Phi-3's longrope: by the sequence length
    freqs = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos() * ref.cfg.rope_attention_factor, emb.sin() * ref.cfg.rope_attention_factor
    h = torch.nn.functional.embedding(ids, ref.embed)
    out = []

    def dist(a, b):
        return 1 - torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                                         dim=-1).double().mean().item()

    for block in ref.blocks:
        if block.post_norm:
            m = h + block.attn_norm(block.attn(h, cos, sin))
        else:
            m = h + block.attn(block.attn_norm(h), cos, sin)
        nxt = block(h, cos, sin)
        out.append((dist(h, nxt), dist(h, m), dist(m, nxt)))
        h = nxt
    return out


@pytest.mark.parametrize("arch", ["olmo2", "phi3", "phi3-longrope"])
def test_calibration_scores_the_residual_stream_around_each_sublayer(tmp_path, arch):
    """phi3-longrope: 64-token sequences, past the original context of 16, so the long factors score them."""
    extra = LONGROPE if arch == "phi3-longrope" else {}
    dense, _ = make_tiny(tmp_path / "dense", arch.split("-")[0], num_hidden_layers=4, tokenizer=True, **extra)
    scores = calibrate(dense, TEXTS, n_tokens=64, seq_len=64, progress=False)
    streamed = calibrate(dense, TEXTS, n_tokens=64, seq_len=64, progress=False, stream=True)
    for name in ("bi", "attn_bi", "mlp_bi"):
        assert np.allclose(getattr(scores, name), getattr(streamed, name), atol=1e-6), name
    tok = checkpoint.load(dense).tokenizer()
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"][:64]])
    expect = np.array(hand_scores(dense, ids))
    got = np.array([scores.bi, scores.attn_bi, scores.mlp_bi]).T
    assert np.allclose(got, expect, atol=1e-5), (got, expect)


@pytest.mark.parametrize("arch", ["olmo2", "phi3"])
def test_pruned_checkpoints_run_like_transformers(tmp_path, arch):
    """calibrate (whole and streamed), prune 2 of 6 layers (shortgpt) and the attention of 2 (attention-only):
    transformers loads the shortgpt checkpoint and generates alike with and without its KV cache; the runtime
    gives its logits within TOL and its greedy tokens; the attention-only checkpoint drops each removed
    attention's own norm and runs in the runtime as in shortrt.reference and on transformers' modules."""
    import transformers

    dense, _ = make_tiny(tmp_path / "dense", arch, num_hidden_layers=6, tokenizer=True)
    scores = calibrate(dense, TEXTS, n_tokens=128, seq_len=32, progress=False)
    streamed = calibrate(dense, TEXTS, n_tokens=128, seq_len=32, progress=False, stream=True)
    for name in ("bi", "attn_bi", "mlp_bi"):
        assert np.allclose(getattr(scores, name), getattr(streamed, name), atol=1e-6), name

    pruned = prune(dense, select(scores, remove=2), tmp_path / "pruned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(pruned.path, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 4
    eng = Engine(pruned.path, threads=2)
    assert eng.num_layers == 4
    assert rel_err(eng.logits(IDS), hf_logits(hf, IDS)) <= TOL
    cached, uncached = hf_greedy(hf, IDS[:5]), hf_greedy(hf, IDS[:5], use_cache=False)
    assert cached == uncached
    assert eng.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == cached

    lmap = select(scores, remove=2, method="attention")
    no_attn = [i for i, e in enumerate(lmap.layers) if not e.attention]
    assert len(no_attn) == 2
    attn_only = prune(dense, lmap, tmp_path / "attn")
    names = set(load_file(attn_only.path / "model.safetensors"))
    attn_norm = "post_attention_layernorm" if arch == "olmo2" else "input_layernorm"
    mlp_norm = "post_feedforward_layernorm" if arch == "olmo2" else "post_attention_layernorm"
    for i in range(6):
        p = f"model.layers.{i}."
        assert (p + f"{attn_norm}.weight" in names) == (i not in no_attn)
        assert (p + "self_attn.o_proj.weight" in names) == (i not in no_attn)
        assert p + f"{mlp_norm}.weight" in names and p + "mlp.down_proj.weight" in names
    ref = ReferenceModel.load(attn_only.path)(torch.tensor([IDS]))[0].numpy()
    eng = Engine(attn_only.path, threads=2)
    assert rel_err(eng.logits(IDS), ref) <= TOL
    hf_dense, plan = load_for_plan(dense)
    plan = tuple(type(s)(s.index, attention=s.index not in no_attn) for s in plan)
    assert rel_err(plan_logits(hf_dense, torch.tensor([IDS]), plan)[0].numpy(), ref) <= TOL
    assert eng.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == ReferenceModel.load(attn_only.path).greedy(
        IDS[:5], 16)


# ---------------------------------------------------------------- both readers, one verdict

def python_verdict(path) -> str:
    try:
        checkpoint.Model(path, str(path), str(path)).check()
    except CheckpointError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return "ok"


def cpp_verdict(path) -> str:
    try:
        _C.read_checkpoint(str(path), [])
    except ValueError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return "ok"


def edit_tensors(edit):
    def apply(d):
        from safetensors.torch import save_file

        t = load_file(d / "model.safetensors")
        edit(t)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return apply


def edit_config(edit):
    def apply(d):
        doc = json.loads((d / "config.json").read_text())
        edit(doc)
        (d / "config.json").write_text(json.dumps(doc))
    return apply


def set_rope(**rope):
    return edit_config(lambda c: c["rope_parameters"].update(rope))


CONTRACT = [
    ("olmo2", edit_tensors(lambda t: t.pop("model.layers.1.post_feedforward_layernorm.weight")),
     "tensor 'model.layers.1.post_feedforward_layernorm.weight' not found in the checkpoint"),
    ("olmo2", edit_tensors(lambda t: t.update({"model.layers.0.input_layernorm.weight": torch.ones(64)})),
     "unexpected tensor 'model.layers.0.input_layernorm.weight' (not part of a Olmo2ForCausalLM)"),
    ("olmo2", edit_tensors(lambda t: t.update({"model.layers.0.self_attn.k_norm.weight": torch.ones(16)})),
     "tensor 'model.layers.0.self_attn.k_norm.weight': expected shape [32], found [16]"),
    ("olmo2", edit_config(lambda c: c.update(attention_bias=True)),
     "attention_bias=true is not supported for Olmo2ForCausalLM"),
    ("phi3", edit_tensors(lambda t: t.pop("model.layers.1.self_attn.qkv_proj.weight")),
     "tensor 'model.layers.1.self_attn.qkv_proj.weight' not found in the checkpoint"),
    ("phi3", edit_tensors(lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.ones(96, 64)})),
     "unexpected tensor 'model.layers.0.mlp.up_proj.weight' (not part of a Phi3ForCausalLM)"),
    ("phi3", edit_tensors(lambda t: t.update({"model.layers.0.mlp.gate_up_proj.weight": torch.ones(96, 64)})),
     "tensor 'model.layers.0.mlp.gate_up_proj.weight': expected shape [192, 64], found [96, 64]"),
    ("phi3", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                      original_max_position_embeddings=64), "ok"),
    ("phi3", set_rope(rope_type="su", short_factor=[1.0] * 8, long_factor=[2.0] * 8), "ok"),  # the top-level original
    ("phi3", set_rope(rope_type="su"), "longrope needs 'rope.short_factor', a list of positive numbers"),
    ("phi3", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 7),
     "longrope 'rope.long_factor' must list rotary_dim / 2 = 8 numbers, got 7"),
    ("phi3", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 7 + [0.0]),
     "longrope needs 'rope.long_factor', a list of positive numbers"),
    ("phi3", edit_config(lambda c: (c.pop("original_max_position_embeddings"),
                                    c["rope_parameters"].update(rope_type="longrope", short_factor=[1.0] * 8,
                                                                long_factor=[2.0] * 8))),
     "missing required field 'original_max_position_embeddings'"),
    ("phi3", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                      original_max_position_embeddings=1), "longrope needs original_max_position_embeddings >= 2"),
    ("phi3", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, attention_factor=-1.0),
     "longrope 'rope.attention_factor' must be positive"),
    ("llama", set_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                       original_max_position_embeddings=64), "unsupported rope scaling type 'longrope'"),
    ("phi3", set_rope(partial_rotary_factor=0.1),
     "partial_rotary_factor 0.1 must lie in (0, 1] and rotate an even number of head_dim 16's dims (got 1)"),
    ("phi3", edit_config(lambda c: c.update(partial_rotary_factor=0.5)), "ok"),  # the rope object's 1.0 wins
    ("llama", set_rope(partial_rotary_factor=0.5), "partial_rotary_factor != 1 is not supported"),
]


@pytest.mark.parametrize("arch,mutate,phrase", CONTRACT)
def test_family_checkpoints_are_read_alike(tmp_path, arch, mutate, phrase):
    path = make_tiny(tmp_path / arch, arch, num_hidden_layers=2)[0]
    assert python_verdict(path) == "ok" and cpp_verdict(path) == "ok"
    mutate(path)
    py, cpp = python_verdict(path), cpp_verdict(path)
    assert phrase in py, f"Python: {py}"
    assert py == cpp


def test_an_attention_less_olmo2_layer_owns_no_post_attention_norm(tmp_path):
    """In OLMo-2 post_attention_layernorm belongs to the attention: a layer without attention must not
    have it (and keeps post_feedforward_layernorm with its MLP), in both readers."""
    check_no_attention_norm_without_attention(make_tiny(tmp_path / "dense", "olmo2", num_hidden_layers=3)[0], tmp_path)


def check_no_attention_norm_without_attention(dense, tmp_path):
    """Layer 1 of the 3-layer `dense` pruned to no attention reads as ok; with its
    post_attention_layernorm put back both readers refuse it with the same message (test_gemma3 too)."""
    from shortrt.layermap import LayerEntry, LayerMap

    lmap = LayerMap(3, [LayerEntry(0), LayerEntry(1, attention=False), LayerEntry(2)], "manual", [])
    out = prune(dense, lmap, tmp_path / "p")
    assert python_verdict(out.path) == "ok" and cpp_verdict(out.path) == "ok"
    src = load_file(dense / "model.safetensors")
    edit_tensors(lambda t: t.update({"model.layers.1.post_attention_layernorm.weight":
                                     src["model.layers.1.post_attention_layernorm.weight"]}))(out.path)
    py = python_verdict(out.path)
    assert py == cpp_verdict(out.path)
    assert "tensor 'model.layers.1.post_attention_layernorm.weight' exists but shortrt.json says layer 1 has no " \
           "attention" in py


# Phi-3's long-context RoPE on a tiny model: original context 16, max_position_embeddings 64 (factor 4, attention
# factor sqrt(1 + ln 4 / ln 16) = 1.22), per-frequency short and long factors far apart.
LONGROPE = dict(max_position_embeddings=64, original_max_position_embeddings=16,
                rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(8)],
                              "long_factor": [1.5 ** i for i in range(8)]})


def test_phi3_longrope_matches_transformers_below_and_above_the_original_context(tmp_path):
    """transformers picks the short factors for a forward over at most 16 tokens and the long ones beyond, for
    every position of that forward (the keys and values of every layer change, not only the rotation). The
    runtime follows it: logits(ids) is transformers' forward over ids, whatever the chunking; a request runs with
    the long factors from the start when its prompt is past 16 tokens, and a request that grows past 16 while
    decoding is prefilled again from position 0 with the long factors, so each of its tokens is transformers'
    greedy choice over the whole sequence so far: its greedy tokens without a cache (transformers' own cached
    generate keeps the short-factor keys and values after crossing, which its full forward does not)."""
    path, model = make_tiny(tmp_path / "p", "phi3", **LONGROPE)
    cfg = checkpoint.load(path).model_config
    assert (cfg.rope_type, cfg.rope_original_max_position) == ("longrope", 16)
    assert cfg.rope_attention_factor == pytest.approx(model.model.rotary_emb.attention_scaling)
    for ids in (IDS[:12], IDS[:16], IDS[:17], IDS):  # 12, 16, 17 and 19 tokens
        ref = hf_logits(model, ids)
        assert rel_err(ReferenceModel.load(path)(torch.tensor([ids]))[0].numpy(), ref) <= TOL, len(ids)
        for chunk in (0, 1, 6):
            assert rel_err(Engine(path, threads=2, max_seq=64).logits(ids, chunk=chunk), ref) <= TOL, (len(ids), chunk)
    # max_seq within the original context: the short factors only
    assert rel_err(Engine(path, threads=2, max_seq=16).logits(IDS[:16]), hf_logits(model, IDS[:16])) <= TOL
    # greedy from 10 tokens to 30, crossing while decoding; from 17 tokens (long from the start); batched
    eng = Engine(path, threads=2, max_seq=64, max_batch=2, prefill_chunk=4)
    cross = hf_greedy(model, IDS[:10], n=20, use_cache=False)
    assert eng.generate_ids(IDS[:10], max_new_tokens=20, stop=[]) == cross
    assert eng.generate_ids(IDS[:17], max_new_tokens=8, stop=[]) == hf_greedy(model, IDS[:17], n=8, use_cache=False)
    both = eng.generate_ids([IDS[:10], IDS[:3]], max_new_tokens=20, stop=[])  # one crosses, then the other
    assert both == [cross, hf_greedy(model, IDS[:3], n=20, use_cache=False)]
    # the long factors matter: the same weights with long_factor = short_factor give other logits past 16
    doc = json.loads((path / "config.json").read_text())
    doc["rope_parameters"]["long_factor"] = doc["rope_parameters"]["short_factor"]
    (path / "config.json").write_text(json.dumps(doc))
    assert rel_err(Engine(path, threads=2, max_seq=64).logits(IDS), hf_logits(model, IDS)) > 1e-2


def test_phi3_sliding_window_below_the_context_is_refused(tmp_path):
    path = make_tiny(tmp_path / "w", "phi3", sliding_window=16)[0]
    assert checkpoint.load(path).model_config.sliding_window == 16
    with pytest.raises(ValueError, match="max_seq 32 exceeds the sliding window of 16"):
        Engine(path, max_seq=32)
    path2, model = make_tiny(tmp_path / "w2", "phi3", sliding_window=64)
    assert rel_err(Engine(path2, max_seq=64).logits(IDS), hf_logits(model, IDS)) <= TOL


# ---------------------------------------------------------------- heal and replace keep the family's layout

@pytest.mark.parametrize("arch", ["olmo2", "phi3"])
def test_healed_and_replaced_checkpoints_keep_the_family_layout(tmp_path, arch):
    """heal (LoRA on the family's own projections: Phi-3's fused qkv_proj / gate_up_proj) and replace
    (kind="mlp": OLMo-2's MLP half is mlp + post_feedforward_layernorm) write checkpoints with the family's
    tensor names, whose trained weights moved, and that the runtime runs as shortrt.reference does."""
    from shortrt import heal, replace
    from shortrt.layermap import LayerMap

    dense, _ = make_tiny(tmp_path / "dense", arch, num_hidden_layers=6, tokenizer=True)
    scores = calibrate(dense, TEXTS, n_tokens=128, seq_len=32, progress=False)
    student = prune(dense, select(scores, remove=2), tmp_path / "s")
    healed = heal(student, tmp_path / "h", texts=TEXTS, n_tokens=512, seq_len=32, steps=10, batch=4,
                  lr=1e-4, precision="fp32", time_limit=None, progress=False)
    assert healed.layer_map.healing["best_step"] > 0  # the trained weights were written, not the student's
    before, after = load_file(student.path / "model.safetensors"), load_file(healed.path / "model.safetensors")
    assert set(before) == set(after)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    fused = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    plain = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert moved == {f"model.layers.{i}.{p}.weight" for i in range(4) for p in (fused if arch == "phi3" else plain)}
    ref = ReferenceModel.load(healed.path)(torch.tensor([IDS]))[0].numpy()
    assert rel_err(Engine(healed.path, threads=2).logits(IDS), ref) <= TOL

    if arch == "olmo2":
        replaced = replace(dense, LayerMap.from_removed(6, [2, 3], method="span"), tmp_path / "r", kind="mlp",
                           texts=TEXTS, n_tokens=512, seq_len=32, steps=4, batch=4, progress=False)
        names = set(load_file(replaced.path / "model.safetensors"))
        assert "model.layers.2.post_feedforward_layernorm.weight" in names
        assert not any(n.startswith("model.layers.2.") and ("self_attn" in n or "post_attention" in n) for n in names)
        ref = ReferenceModel.load(replaced.path)(torch.tensor([IDS]))[0].numpy()
        assert rel_err(Engine(replaced.path, threads=2).logits(IDS), ref) <= TOL


def test_full_healing_trains_each_olmo2_sublayer_with_its_own_norm(tmp_path):
    """heal(full=True) trains a kept sublayer's weights and its norm, which in OLMo-2 follows it:
    post_attention_layernorm with the attention, post_feedforward_layernorm with the MLP."""
    from shortrt.healing import make_trainable
    from shortrt.layermap import LayerEntry, LayerMap

    dense = make_tiny(tmp_path / "dense", "olmo2", num_hidden_layers=3)[0]
    lmap = LayerMap(3, [LayerEntry(0), LayerEntry(1, attention=False), LayerEntry(2)], "manual", [])
    hf, plan = load_for_plan(prune(dense, lmap, tmp_path / "p"))
    _, trained = make_trainable(hf, plan, rank=4, alpha=8.0, full=True, seed=0)
    norms = {n for n in trained if "layernorm" in n}
    assert norms == {"model.layers.0.post_attention_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
                     "model.layers.1.post_feedforward_layernorm.weight",
                     "model.layers.2.post_attention_layernorm.weight", "model.layers.2.post_feedforward_layernorm.weight"}
    assert "model.layers.1.self_attn.q_norm.weight" not in trained and "model.layers.0.self_attn.q_norm.weight" in trained
