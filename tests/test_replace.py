"""Span replacement (shortrt.replace, LLM-Streamline): training core, checkpoint layout, runtimes.

Tiny random Llamas throughout. Tolerances: the C++ engine in fp32 and transformers against
shortrt.reference within 1e-4 (max |logit difference| / max |reference logit|), as in
test_runtime_logits; bf16 within 0.02 and int8 within 0.06, as in test_runtime_generate.
"""
import json

import pytest
import torch

import shortrt
from conftest import read_meta, tensors_of
from runtime_models import make_tiny, prose, rel_err
from shortrt.engine import Engine
from shortrt.errors import CheckpointError, ShortrtError
from shortrt.layermap import LayerMap
from shortrt.reference import ReferenceModel
from shortrt.replacement import DEFAULT_LR, replace, replaced_checkpoint, span_of
from shortrt.replace_training import train_replacement

TOL = 1e-4
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4]
SPAN = [2, 3, 4]
FAST = dict(n_tokens=2048, seq_len=64, steps=30, progress=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path, _ = make_tiny(tmp_path_factory.mktemp("dense") / "m", num_hidden_layers=6, tokenizer=True)
    return path


@pytest.fixture(scope="module")
def span_map():
    return LayerMap.from_removed(6, SPAN, method="span")


@pytest.fixture(scope="module")
def replaced(dense, span_map, tmp_path_factory):
    """{kind: checkpoint} for both kinds, trained once for the module."""
    root = tmp_path_factory.mktemp("replaced")
    return {kind: replace(dense, span_map, root / kind, kind=kind, texts=prose(), **FAST) for kind in ("layer", "mlp")}


# ---- the layer map --------------------------------------------------------------------------

@pytest.mark.parametrize("lmap,message", [
    (LayerMap.from_removed(6, [1, 3]), "one contiguous removed span"),
    (LayerMap.dense(6), "removes no layers"),
    (LayerMap.from_removed_attention(6, [2]), "attention or MLP sublayer pruning"),
])
def test_span_of_rejects_maps_without_one_contiguous_span(lmap, message):
    with pytest.raises(ShortrtError, match=message):
        span_of(lmap)


def test_span_of_accepts_a_span_map():
    assert span_of(LayerMap.from_removed(6, [4, 2, 3])) == [2, 3, 4]


def test_replace_rejects_bad_input_before_training(dense, span_map, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        replace(dense, span_map, tmp_path / "x", kind="conv", texts=prose())
    with pytest.raises(ValueError, match="layer map is for a model with 8 layers"):
        replace(dense, LayerMap.from_removed(8, SPAN), tmp_path / "x", texts=prose())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        replace(dense, span_map, busy, texts=prose(), seq_len=64)
    with pytest.raises(ShortrtError, match="at least 2 calibration sequences of 64 tokens"):
        replace(dense, span_map, tmp_path / "x", texts=["too short"], n_tokens=2048, seq_len=64)
    with pytest.raises(TypeError, match="LayerMap"):
        replace(dense, {"removed": SPAN}, tmp_path / "x", texts=prose())


# ---- the training core ----------------------------------------------------------------------

def _batches(n_seq=8, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (4, seq_len), generator=g) for _ in range(n_seq // 4)]


def test_a_one_layer_span_is_mapped_exactly_by_its_own_layer(dense):
    """The copy of the span's only layer, run by the trainer, reproduces the captured output:
    capture, causal mask and rotary positions match the model's own forward pass."""
    hf = shortrt.load(dense).load_hf()
    result = train_replacement(hf, [3], _batches(), kind="layer", steps=1, progress=False)
    assert result.init_layer == 3
    assert result.heldout_loss_at_init <= 1e-10 * result.heldout_loss_identity


def test_the_mlp_kind_reproduces_a_layer_whose_attention_is_zero(dense):
    hf = shortrt.load(dense).load_hf()
    with torch.no_grad():
        hf.model.layers[2].self_attn.o_proj.weight.zero_()
    result = train_replacement(hf, [2], _batches(), kind="mlp", steps=1, progress=False)
    assert result.heldout_loss_at_init <= 1e-10 * result.heldout_loss_identity
    assert sorted(result.module.state_dict()) == ["mlp.down_proj.weight", "mlp.gate_proj.weight",
                                                  "mlp.up_proj.weight", "post_attention_layernorm.weight"]


def test_training_is_deterministic_and_beats_its_start(dense):
    hf = shortrt.load(dense).load_hf()
    runs = [train_replacement(hf, SPAN, _batches(16), kind="mlp", steps=12, eval_every=4, lr=1e-3,
                              progress=False) for _ in range(2)]
    a, b = (r.module.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].heldout_loss < runs[0].heldout_loss_at_init
    assert runs[0].best_step > 0


def test_early_stop_keeps_the_initial_weights_when_training_only_hurts(dense):
    hf = shortrt.load(dense).load_hf()
    init = hf.model.layers[2].state_dict()
    result = train_replacement(hf, SPAN, _batches(16), kind="layer", steps=50, lr=5.0, eval_every=1,
                               patience=2, progress=False)
    assert result.steps == 2  # two evaluations without a gain, then stop
    assert result.best_step == 0 and result.heldout_loss == result.heldout_loss_at_init
    kept = result.module.state_dict()
    assert all(torch.equal(kept[k], hf.model.layers[result.init_layer].state_dict()[k]) for k in kept)
    assert all(torch.equal(init[k], hf.model.layers[2].state_dict()[k]) for k in init)  # dense model untouched


def test_streamed_capture_gives_the_in_memory_states(dense):
    """A LayerStream (one layer's weights at a time) captures the span's states that the hooks on
    the whole model capture, to fp32 rounding of a different summation order (1e-5 relative)."""
    from shortrt.replace_training import capture_span_states, capture_span_states_streaming
    from shortrt.streaming import LayerStream

    m = shortrt.load(dense)
    batches = _batches(4)
    whole = capture_span_states(m.load_hf(), batches, SPAN, progress=False)
    streamed = capture_span_states_streaming(LayerStream(m), batches, SPAN, progress=False)
    for a, b in ((whole.inputs, streamed.inputs), (whole.targets, streamed.targets)):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_streamed_training_matches_the_in_memory_training(dense):
    from shortrt.streaming import LayerStream

    m = shortrt.load(dense)
    kw = dict(kind="layer", steps=6, eval_every=3, lr=1e-3, progress=False)
    whole = train_replacement(m.load_hf(), SPAN, _batches(8), **kw)
    streamed = train_replacement(LayerStream(m), SPAN, _batches(8), **kw)
    assert streamed.init_layer == whole.init_layer and streamed.steps == whole.steps
    assert streamed.heldout_loss == pytest.approx(whole.heldout_loss, rel=1e-3)
    a, b = whole.module.state_dict(), streamed.module.state_dict()
    assert sorted(a) == sorted(b)
    assert all(float((a[k] - b[k]).abs().max()) <= 1e-4 * max(float(a[k].abs().max()), 1e-6) for k in a)


def test_replace_streams_when_told_and_records_it(dense, span_map, tmp_path, replaced):
    out = replace(dense, span_map, tmp_path / "streamed", kind="mlp", texts=prose(), stream=True, **FAST)
    rec = out.layer_map.replacement
    assert rec["streamed"] is True and replaced["mlp"].layer_map.replacement["streamed"] is False
    assert rec["init_layer"] == replaced["mlp"].layer_map.replacement["init_layer"]
    assert rec["heldout_loss"] == pytest.approx(replaced["mlp"].layer_map.replacement["heldout_loss"], rel=1e-2)
    got, want = tensors_of(out.path), tensors_of(replaced["mlp"].path)
    assert sorted(got) == sorted(want)
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= 1e-3 * max(float(want[name].abs().max()), 1e-6), name


# ---- the written checkpoints ----------------------------------------------------------------

def test_layer_replacement_checkpoint_layout_and_record(replaced, dense):
    ckpt = replaced["layer"]
    meta = read_meta(ckpt)
    lmap = LayerMap.from_json(meta)  # validates
    assert [e.source for e in lmap.layers] == [0, 1, SPAN, 5] and lmap.removed == []
    entry = lmap.layers[2]
    assert (entry.kind, entry.attention, entry.mlp) == ("layer_replacement", True, True)
    assert lmap.transformers_compatible and lmap.num_attention == 4
    rec = meta["replacement"]
    assert rec["kind"] == "layer" and rec["span"] == SPAN and rec["init_layer"] in SPAN
    assert rec["data"]["n_tokens"] == rec["data"]["seq_len"] * rec["data"]["n_sequences"] <= 2048
    assert 1 <= rec["steps"] <= 30 and rec["lr"] == DEFAULT_LR
    # Training kept weights that map the span better than plain removal, on held-out sequences.
    assert rec["heldout_loss"] <= rec["heldout_loss_at_init"]
    assert rec["heldout_loss"] < rec["heldout_loss_identity"]
    assert ckpt.config()["num_hidden_layers"] == 4
    src, dst = tensors_of(dense), tensors_of(ckpt.path)
    for new, old in ((0, 0), (1, 1), (3, 5)):
        assert torch.equal(dst[f"model.layers.{new}.mlp.up_proj.weight"], src[f"model.layers.{old}.mlp.up_proj.weight"])
    assert not torch.equal(dst["model.layers.2.mlp.up_proj.weight"],
                           src[f"model.layers.{rec['init_layer']}.mlp.up_proj.weight"])
    assert sum(k.startswith("model.layers.2.") for k in dst) == 9


def test_layer_replacement_loads_in_transformers_and_engine(replaced):
    ckpt = replaced["layer"]
    hf = ckpt.load_hf()
    assert [layer.self_attn.layer_idx for layer in hf.model.layers] == [0, 1, 2, 3]
    expected = ReferenceModel.load(ckpt)(torch.tensor([IDS]))[0].numpy()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([IDS])).logits[0].numpy()
        # Generation with transformers' KV cache equals generation without it.
        cached = hf.generate(torch.tensor([IDS[:5]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=True)[0, 5:].tolist()
        uncached = hf.generate(torch.tensor([IDS[:5]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0, use_cache=False)[0, 5:].tolist()
    assert rel_err(hf_logits, expected) <= TOL
    assert cached == uncached
    eng = Engine(ckpt, threads=2)
    assert eng.num_layers == 4 and eng.num_attention_layers == 4
    assert rel_err(eng.logits(IDS), expected) <= TOL
    assert eng.generate_ids(IDS[:5], max_new_tokens=12, stop=[]) == cached


def test_mlp_replacement_checkpoint_layout(replaced, dense):
    ckpt = replaced["mlp"]
    lmap = LayerMap.from_json(read_meta(ckpt))
    entry = lmap.layers[2]
    assert (entry.source, entry.kind, entry.attention, entry.mlp) == (SPAN, "mlp_replacement", False, True)
    assert lmap.num_attention == 3
    dst = tensors_of(ckpt.path)
    assert sorted(k for k in dst if k.startswith("model.layers.2.")) == [
        "model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
        "model.layers.2.mlp.up_proj.weight", "model.layers.2.post_attention_layernorm.weight"]
    # Parameter budget: exactly one layer's MLP (and its norm).
    src = tensors_of(dense)
    names = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")
    budget = sum(src[f"model.layers.0.{n}"].numel() for n in names)
    assert read_meta(ckpt)["replacement"]["parameters"] == budget
    with pytest.raises(CheckpointError, match="transformers cannot run it"):
        ckpt.load_hf()


def test_mlp_replacement_runs_in_engine_reference_and_layer_plan(replaced, dense):
    from shortrt.layer_plan import load_for_plan, plan_logits

    ckpt = replaced["mlp"]
    expected = ReferenceModel.load(ckpt)(torch.tensor([IDS]))[0].numpy()
    eng = Engine(ckpt, threads=2, max_seq=64)
    assert eng.num_layers == 4 and eng.num_attention_layers == 3
    assert rel_err(eng.logits(IDS), expected) <= TOL
    assert rel_err(eng.logits(IDS, chunk=1), expected) <= TOL  # through the KV cache
    hf, plan = load_for_plan(ckpt)  # what shortrt.evaluate runs
    assert rel_err(plan_logits(hf, torch.tensor([IDS]), plan)[0].numpy(), expected) <= TOL
    # KV cache: 3 retained attentions of the dense model's per-layer size.
    per_layer = Engine(dense, max_seq=64).kv_cache_bytes // 6
    assert eng.kv_cache_bytes == 3 * per_layer


@pytest.mark.parametrize("kind", ["layer", "mlp"])
@pytest.mark.parametrize("dtype,bound", [("bf16", 0.02), ("int8", 0.06)])
def test_replaced_checkpoints_run_in_packed_dtypes(replaced, kind, dtype, bound):
    ckpt = replaced[kind]
    expected = ReferenceModel.load(ckpt)(torch.tensor([IDS]))[0].numpy()
    out = Engine(ckpt, dtype=dtype, threads=2).logits(IDS)
    assert rel_err(out, expected) <= bound
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.8  # trained weights leave some near-ties


def test_replacing_an_already_pruned_checkpoint_is_refused(replaced, tmp_path):
    with pytest.raises(ShortrtError, match="already pruned"):
        replace(replaced["layer"], LayerMap.from_removed(4, [1]), tmp_path / "x", texts=prose())


# ---- the cached benchmark checkpoints and the command ---------------------------------------

def _span_scores(n=6, best_start=2, max_span=4):
    """A scores dict whose span table makes the span starting at best_start the closest."""
    table = [[(0.1 if s == best_start else 0.5) if s + k <= n else None for k in range(1, max_span + 1)]
             for s in range(n)]
    return {"model": "tiny", "num_layers": n, "max_span": max_span, "span_angular": table,
            "bi": [0.5] * n, "data": {"n_tokens": 1}}


def test_replaced_checkpoint_is_made_once_and_reused(dense, monkeypatch, tmp_path):
    import importlib

    replace_module = importlib.import_module("shortrt.replacement")  # the module (shortrt.replace is the function)
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    texts = prose()
    first = replaced_checkpoint(dense, _span_scores(), 3, "mlp", texts=texts, **FAST)
    assert first.path == (tmp_path / "cache" / "bench" / dense.name / "span+mlp-p3").resolve()
    assert read_meta(first)["replacement"]["span"] == SPAN

    def no_training(*args, **kw):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(replace_module, "replace", no_training)
    assert replaced_checkpoint(dense, _span_scores(), 3, "mlp", texts=texts).path == first.path
    with pytest.raises(AssertionError, match="reused"):  # another span: rebuilt
        replaced_checkpoint(dense, _span_scores(best_start=1), 3, "mlp", texts=texts)
    with pytest.raises(AssertionError, match="reused"):  # trained on other text (here: the default mix): rebuilt
        replaced_checkpoint(dense, _span_scores(), 3, "mlp")


def test_replace_command(dense, tmp_path, capsys):
    from shortrt.cli import main

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(_span_scores()))
    data = tmp_path / "text.txt"
    data.write_text(prose()[0])
    out = tmp_path / "out"
    argv = [str(dense), "--scores", str(scores), "--remove", "3", "--kind", "layer", "--out", str(out),
            "--data", str(data), "--tokens", "1024", "--seq-len", "64", "--steps", "4", "--no-progress"]
    assert main(["replace", *argv]) == 0
    printed = capsys.readouterr().out
    assert "layers 2-4" in printed and str(out) in printed
    meta = json.loads((out / "shortrt.json").read_text())
    assert meta["replacement"]["steps"] <= 4 and meta["replacement"]["data"]["n_tokens"] == 1024
    assert main(["replace", *argv]) == 1  # out exists: refused without --force
    assert "--force" in capsys.readouterr().err
    # a scores file that selects no span is reported, not a crash
    scores.write_text(json.dumps({**_span_scores(), "span_angular": [[None] * 4] * 6}))
    assert main(["replace", *argv, "--force"]) == 1
    assert "no finite span distance" in capsys.readouterr().err


# ---- end to end on the real default model ---------------------------------------------------

@pytest.mark.slow
def test_default_model_span_replaced_by_a_layer_runs_in_transformers_and_engine(default_model, tmp_path):
    """A short training run on SmolLM2-135M: the trained layer maps the span better than removal on
    held-out sequences, and the standard checkpoint it writes generates the same greedy tokens in
    transformers (with its KV cache) and in the C++ engine."""
    lmap = LayerMap.from_removed(30, [14, 15], method="span")
    ckpt = replace(default_model, lmap, tmp_path / "p2", kind="layer", n_tokens=2048, seq_len=256, steps=8,
                   progress=False)
    rec = read_meta(ckpt)["replacement"]
    assert rec["span"] == [14, 15] and rec["data"]["n_tokens"] == 2048
    assert rec["heldout_loss"] < rec["heldout_loss_identity"]
    eng = Engine(ckpt, threads=2, max_seq=128)
    assert eng.num_layers == 29 and eng.num_attention_layers == 29
    prompt = eng.encode("The capital of France is Paris. The capital of Italy is")
    hf = ckpt.load_hf()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0, use_cache=True)[0, len(prompt):].tolist()
    assert eng.generate_ids(prompt, max_new_tokens=12, stop=[]) == expected
