"""Exported GGUF files in real llama.cpp (not in CI: skipped unless $SHORTRT_LLAMA_CPP_BIN names a
llama.cpp build's bin directory with llama-server, llama-perplexity and libggml-base.so).

- shortrt's numpy Q8_0/Q4_0 packing equals ggml's own C routine (ggml_quantize_chunk) bit for bit;
- llama-server loads every exported variant and, from the f32 file with an f32 KV cache, gives
  shortrt fp32's greedy tokens: on tiny random models until the first position where shortrt's
  top two logits tie within 1e-4 (random weights make ties), on the default model for 32 tokens;
- llama-perplexity on held-out text (Persuasion, llama.cpp's protocol: 512-token windows, the second
  half of each scored, f32 KV cache) on the same token ids: the f32 / f16 files within 0.1% / 0.5% of
  shortrt fp32; the q8_0 / q4_0 files within 2% of shortrt fp32 running the file's dequantized
  weights (ggml's CPU dot products quantize activations to 8 bits for those types). How far
  q8_0 / q4_0 move perplexity from fp32 is recorded, not asserted: it is the formats' cost.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import shortrt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_tools as lc  # noqa: E402
from runtime_models import IDS_SHORT  # noqa: E402
from shortrt import gguf_quants  # noqa: E402
from shortrt.gguf_export import export_gguf  # noqa: E402
from shortrt.layermap import LayerMap  # noqa: E402
from shortrt.reference import ReferenceModel  # noqa: E402

pytestmark = pytest.mark.skipif(lc.binary("llama-server") is None, reason=lc.skip_reason("llama-server"))

# f32, f16 against shortrt fp32; q8_0 / q4_0 against shortrt fp32 running the dequantized weights of
# the file, within 2%: ggml's CPU dot products quantize the activations to 8 bits for these types.
PPL_TOLERANCE = {"f32": 0.001, "f16": 0.005, "q8_0": 0.02, "q4_0": 0.02}
# The default model's variants of benchmarks/results (ShortGPT's 8 layers, the 8 attentions of
# `--method attention`, the 8-layer span of `--method span`).
SHORTGPT_8 = [3, 12, 13, 14, 15, 17, 25, 26]
ATTENTION_8 = [5, 6, 7, 20, 25, 26, 28, 29]
SPAN_8 = list(range(11, 19))
RESULTS = os.environ.get("SHORTRT_EXPORT_RESULTS")  # a JSON file to record the figures in, if set


def agree_until_tie(ref_model, ids, ref, got):
    """True when `got` equals `ref`, or differs first where the reference's top two logits tie."""
    for k, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            with torch.no_grad():
                logits = ref_model.forward(torch.tensor([ids + ref[:k]]))[0, -1]
            return bool(abs(logits[a] - logits[b]) <= 1e-4 * logits.abs().max()), k
    return len(got) == len(ref), len(ref)


def test_numpy_packing_equals_ggml_c(monkeypatch):
    lib = Path(os.environ[lc.BIN_ENV]) / "libggml-base.so"
    if not lib.is_file():
        pytest.skip(f"{lib} not found")
    monkeypatch.setenv(gguf_quants.GGML_LIB_ENV, str(lib))
    gguf_quants._ggml.cache_clear()
    try:
        rng = np.random.default_rng(3)
        x = (rng.standard_normal((96, 256)) * rng.uniform(1e-4, 30, (96, 1))).astype(np.float32)
        x[0], x[1, :32], x[2, :32] = 0, 2.5, np.float32(0.125) * np.arange(-16, 16)
        for qtype, fn in (("q8_0", gguf_quants.quantize_q8_0_numpy), ("q4_0", gguf_quants.quantize_q4_0_numpy)):
            np.testing.assert_array_equal(fn(x), gguf_quants.quantize_ggml(x, qtype))
        assert gguf_quants.encoder() == f"ggml ({lib})"
    finally:
        gguf_quants._ggml.cache_clear()


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory):
    from test_export_gguf import build_variants

    return build_variants(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("name", ["dense", "shortgpt", "span", "attention", "span+layer", "span+mlp",
                                  "shortgpt+heal", "attention+heal", "mistral", "llama3-rope", "linear-rope",
                                  "qwen2", "qwen2-attention"])
def test_llama_cpp_runs_tiny_exports_as_shortrt_does(tiny_variants, name, tmp_path):
    ckpt = tiny_variants[name]
    ref_model = ReferenceModel.load(ckpt)
    ref = ref_model.greedy(IDS_SHORT, 32)
    out = export_gguf(ckpt, tmp_path / f"{name}.gguf", qtype="f32")
    with lc.server(out) as greedy:
        got = greedy(IDS_SHORT, 32)
    ok, k = agree_until_tie(ref_model, IDS_SHORT, ref, got)
    assert ok and k >= 8, f"{name}: llama.cpp {got} vs shortrt {ref} (first difference at {k})"


class DefaultVariants:
    """The default model's variants, each made when first asked for (training only what a test needs)."""

    def __init__(self, model, root):
        self.model, self.root, self.made = model, root, {"dense": model.path}

    def __getitem__(self, name):
        if name not in self.made:
            self.made[name] = self._make(name)
        return self.made[name]

    def _make(self, name):
        from shortrt.replacement import replace
        from test_export_gguf import prose

        if name == "shortgpt-8":
            return shortrt.prune(self.model, LayerMap.from_removed(30, SHORTGPT_8, method="shortgpt"),
                                 self.root / name).path
        if name == "attention-8":
            return shortrt.prune(self.model, LayerMap.from_removed_attention(30, ATTENTION_8), self.root / name).path
        kind = {"span+layer-8": "layer", "span+mlp-8": "mlp"}[name]
        # a short training run: this checks loading and equality, not quality
        return replace(self.model, LayerMap.from_removed(30, SPAN_8, method="span"), self.root / name, kind=kind,
                       texts=prose(), n_tokens=4096, seq_len=128, steps=5, progress=False).path


@pytest.fixture(scope="module")
def default_variants(default_model, tmp_path_factory):
    return DefaultVariants(default_model, tmp_path_factory.mktemp("llama-cpp-default"))


def heldout_text(tmp_path) -> Path:
    from shortrt.data import austen_novels

    text = austen_novels()["persuasion"][:60000]
    p = tmp_path / "persuasion.txt"
    p.write_text(text)
    return p


def llama_cpp_ppl_protocol(model: ReferenceModel, ids: list[int], ctx: int, chunks: int) -> float:
    """llama-perplexity's number computed by shortrt's reference model on the same windows."""
    def logits_of(window):
        with torch.no_grad():
            return model.forward(torch.tensor([window]))[0].double().numpy()

    return lc.protocol_perplexity(logits_of, ids, ctx, chunks)


def record(key, value):
    if RESULTS:
        p = Path(RESULTS)
        doc = json.loads(p.read_text()) if p.exists() else {}
        doc[key] = value
        p.write_text(json.dumps(doc, indent=2) + "\n")


@pytest.mark.parametrize("name", ["dense", "shortgpt-8", "attention-8", "span+layer-8", "span+mlp-8"])
def test_llama_cpp_f32_gives_shortrt_fp32_greedy_tokens_on_the_default_model(default_variants, name, tmp_path):
    from shortrt.engine import Engine

    ckpt = default_variants[name]
    tok = shortrt.load(ckpt).tokenizer()
    ids = tok("Once upon a time, in a small village by the sea,")["input_ids"]
    ref = Engine(ckpt, dtype="fp32", threads=2).generate_ids(ids, max_new_tokens=32, stop=[])
    out = export_gguf(ckpt, tmp_path / f"{name}.gguf", qtype="f32")
    with lc.server(out) as greedy:
        got = greedy(ids, 32)
    record(f"greedy/{name}", {"shortrt": ref, "llama.cpp": got})
    assert got == ref


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of shortrt.gguf_export.rope_permute."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_of_file(ckpt, gguf_file) -> ReferenceModel:
    """shortrt's fp32 reference model running the weights a GGUF file holds (dequantized)."""
    from shortrt.gguf_export import gguf_name

    m = shortrt.load(ckpt)
    cfg, tensors = m.model_config, m.read_tensors()
    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}
    for name in tensors:
        g = gguf_name(name)
        if g not in stored:  # a tied lm_head
            continue
        t = stored[g]
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tensors[name].shape)
        if g.endswith(".attn_q.weight"):
            x = rope_unpermute(x, cfg.n_heads)
        elif g.endswith(".attn_k.weight"):
            x = rope_unpermute(x, cfg.n_kv_heads)
        tensors[name] = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
    return ReferenceModel(cfg, tensors, m.plan())


@pytest.mark.skipif(lc.binary("llama-perplexity") is None, reason=lc.skip_reason("llama-perplexity"))
@pytest.mark.parametrize("name", ["dense", "attention-8"])
def test_llama_cpp_perplexity_of_each_type_is_near_shortrt_fp32(default_variants, name, tmp_path):
    ckpt, ctx, chunks = default_variants[name], 512, 6
    text = heldout_text(tmp_path)
    files = {t: export_gguf(ckpt, tmp_path / f"{name}.{t}.gguf", qtype=t) for t in PPL_TOLERANCE}
    with lc.server(files["f32"]) as client:
        ids = client.tokenize(text.read_text())
    assert len(ids) >= ctx * chunks
    want = llama_cpp_ppl_protocol(ReferenceModel.load(ckpt), ids, ctx, chunks)
    # Q8_0 / Q4_0 cost perplexity by themselves; what the export must get right is that llama.cpp
    # runs the weights the file holds: shortrt fp32 on those weights, dequantized, is the reference.
    same_weights = {t: llama_cpp_ppl_protocol(model_of_file(ckpt, files[t]), ids, ctx, chunks)
                    for t in ("q8_0", "q4_0")}
    got = {t: lc.perplexity(f, text, ctx=ctx, chunks=chunks) for t, f in files.items()}
    record(f"ppl/{name}", {"shortrt fp32": want, **got,
                           **{f"shortrt fp32 on the {t} weights": v for t, v in same_weights.items()}})
    for t, tol in PPL_TOLERANCE.items():
        ref = same_weights.get(t, want)
        assert abs(got[t] / ref - 1) <= tol, f"{name} {t}: llama.cpp ppl {got[t]:.4f}, shortrt fp32 {ref:.4f}"
