"""int4 weights and the LM head's own format in the engine: logits against fp32 within a
stated tolerance, greedy tokens, the bytes held and read, one copy of a tied embedding when
the formats agree, and clear errors for bad values.

Tolerances (max |logit difference| / max |fp32 logit|, tests/runtime_models.rel_err), measured
on the default model with PROMPT: int4 with the int4 LM head 0.153, with an fp32/bf16/int8
head 0.079-0.081; the bounds below leave ~30% room. The tiny random model is far from any 4-bit
grid (its weights are Gaussian), so its bound is looser (measured 0.28).
"""
import numpy as np
import pytest

from runtime_models import IDS_SHORT, make_tiny, rel_err
from shortrt.costs import weight_table
from shortrt.engine import DTYPES, KV_DTYPES, LM_HEAD_DTYPES, Engine


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("int4") / "tied", tie_word_embeddings=True)[0]


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("int4") / "untied", tie_word_embeddings=False)[0]


def matrix_bytes(rows, cols, dtype):
    # int4 rows are held in interleaved groups of 16, the last padded with zero rows (csrc/kernels.h: BlockQ4x16).
    return {"fp32": 4 * rows * cols, "bf16": 2 * rows * cols, "int8": rows * cols // 32 * 36,
            "int4": -(-rows // 16) * 16 * cols // 32 * 20}[dtype]


def test_int4_logits_close_to_fp32_on_a_random_model(tiny_untied):
    ref = Engine(tiny_untied, threads=2).logits(IDS_SHORT)
    out = Engine(tiny_untied, dtype="int4", threads=2).logits(IDS_SHORT)
    assert 0 < rel_err(out, ref) <= 0.35  # measured 0.28


def test_int4_on_grid_weights_err_only_by_the_int8_activations(tiny_untied, tmp_path):
    # The same checkpoint with every matrix replaced by its int4 dequantization: packing it again
    # is exact, so the int4 engine differs from the fp32 engine only by quantizing activations
    # to int8, as the int8 engine does (and int8 also rounds the weights).
    import shutil

    from safetensors.numpy import load_file, save_file

    from shortrt import _C

    grid = tmp_path / "grid"
    shutil.copytree(tiny_untied, grid)
    tensors = load_file(str(grid / "model.safetensors"))
    for name, t in tensors.items():
        if t.ndim == 2:
            tensors[name] = _C.dequantize_q4(*_C.quantize_q4(t.ravel())).reshape(t.shape)
    save_file(tensors, str(grid / "model.safetensors"), metadata={"format": "pt"})
    ref = Engine(grid, threads=2).logits(IDS_SHORT)
    int4 = rel_err(Engine(grid, dtype="int4", lm_head_dtype="same", threads=2).logits(IDS_SHORT), ref)
    int8 = rel_err(Engine(grid, dtype="int8", threads=2).logits(IDS_SHORT), ref)
    assert 0 < int4 <= 0.03 and int4 <= int8  # measured 0.016 and 0.020


def test_int4_decode_through_the_cache_equals_prefill(tiny_untied):
    # The int4 matmul gives the same bits for 1 token or many; only attention's two code
    # paths (decode, prefill) differ in rounding, as for fp32 (tests/test_runtime_logits.py).
    eng = Engine(tiny_untied, dtype="int4", threads=2)
    assert rel_err(eng.logits(IDS_SHORT, chunk=1), eng.logits(IDS_SHORT)) <= 1e-5


@pytest.mark.parametrize("lm_head", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_lm_head_format_and_bytes_with_tied_embeddings(tiny_tied, dtype, lm_head):
    c = Engine(tiny_tied, threads=1).config
    vocab, hidden = c["vocab_size"], c["hidden_size"]
    same = Engine(tiny_tied, dtype=dtype, lm_head_dtype="same", threads=1)
    eng = Engine(tiny_tied, dtype=dtype, lm_head_dtype=lm_head, threads=1)
    assert same.lm_head_dtype == dtype and eng.lm_head_dtype == lm_head
    head_same, head = matrix_bytes(vocab, hidden, dtype), matrix_bytes(vocab, hidden, lm_head)
    assert same.weight_bytes == weight_table(tiny_tied, dtype, "same").at(4, 4)
    assert eng.weight_bytes == weight_table(tiny_tied, dtype, lm_head).at(4, 4)
    if lm_head == dtype:  # one copy serves the embedding and the head
        assert eng.weight_bytes == same.weight_bytes
    else:  # the embedding stays in dtype, the head is a copy of its own
        assert eng.weight_bytes == same.weight_bytes + head
    assert eng.weight_bytes_per_token == same.weight_bytes_per_token - head_same + head


@pytest.mark.parametrize("dtype,head", [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int8")])
def test_default_lm_head_is_int8_under_int4_else_the_dtype(tiny_untied, tiny_tied, dtype, head):
    for path in (tiny_untied, tiny_tied):
        eng = Engine(path, dtype=dtype, threads=1)
        assert eng.lm_head_dtype == head
        assert eng.weight_bytes == weight_table(path, dtype).at(4, 4) == weight_table(path, dtype, head).at(4, 4)
    np.testing.assert_array_equal(Engine(tiny_untied, dtype=dtype, threads=1).logits(IDS_SHORT),
                                  Engine(tiny_untied, dtype=dtype, lm_head_dtype=head, threads=1).logits(IDS_SHORT))


def test_lm_head_format_changes_only_the_head(tiny_untied, tiny_tied):
    # fp32 layers with an fp32 head given explicitly are the plain fp32 engine, bit for bit;
    # an int8 head on fp32 layers moves the logits by about int8's error, not more.
    ref = Engine(tiny_untied, threads=2).logits(IDS_SHORT)
    np.testing.assert_array_equal(Engine(tiny_untied, lm_head_dtype="fp32", threads=2).logits(IDS_SHORT), ref)
    int8_head = Engine(tiny_untied, lm_head_dtype="int8", threads=2).logits(IDS_SHORT)
    assert 0 < rel_err(int8_head, ref) <= 0.05
    # Tied: int4 layers with an fp32 head keep the int4 embedding rows (same inputs as int4/int4).
    a = Engine(tiny_tied, dtype="int4", lm_head_dtype="fp32", threads=2)
    b = Engine(tiny_tied, dtype="int4", lm_head_dtype="same", threads=2)
    assert not np.array_equal(a.logits(IDS_SHORT), b.logits(IDS_SHORT))


def test_bad_dtype_and_lm_head_dtype_are_clear_errors(tiny_untied):
    with pytest.raises(ValueError, match=r"unknown dtype 'int3' \(expected one of fp32, bf16, int8, int4\)"):
        Engine(tiny_untied, dtype="int3")
    with pytest.raises(ValueError, match=r"unknown lm_head_dtype 'fp16' \(expected one of auto, same, fp32, bf16, int8, int4\)"):
        Engine(tiny_untied, lm_head_dtype="fp16")
    from shortrt import _C

    with pytest.raises(ValueError, match="unknown lm_head_dtype 'fp16' \\(expected auto, same, fp32, bf16, int8 or int4\\)"):
        _C.Engine(str(tiny_untied), "fp32", 1, 0, 1, [], 0, 0, "fp32", "fp16")
    with pytest.raises(ValueError, match="unknown dtype 'q4' \\(expected fp32, bf16, int8 or int4\\)"):
        _C.Engine(str(tiny_untied), "q4", 1, 0, 1, [], 0, 0, "fp32", "same")


def test_int4_needs_widths_that_are_multiples_of_32(tmp_path):
    path = make_tiny(tmp_path / "odd", hidden_size=48, intermediate_size=80, num_attention_heads=4)[0]
    with pytest.raises(Exception, match="int4 weights need every matrix width to be a multiple of 32"):
        Engine(path, dtype="int4")
    with pytest.raises(Exception, match="int4 weights need every matrix width to be a multiple of 32"):
        Engine(path, lm_head_dtype="int4")


def test_cli_choices_are_the_engines():
    from shortrt import commands

    assert commands.DTYPES == DTYPES and commands.LM_HEAD_DTYPES == LM_HEAD_DTYPES and commands.KV_DTYPES == KV_DTYPES


def test_int4_refuses_nan_weights_even_when_allowed(tmp_path, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from shortrt.errors import CheckpointError

    path = make_tiny(tmp_path / "nan")[0]
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.delenv("SHORTRT_ALLOW_NONFINITE", raising=False)
    with pytest.raises(CheckpointError, match="up_proj.weight' in .* holds NaN/Inf values"):
        Engine(path, dtype="int4")
    monkeypatch.setenv("SHORTRT_ALLOW_NONFINITE", "1")
    with pytest.raises(CheckpointError, match="up_proj.weight' in .*: int4 weights cannot hold NaN/Inf"):
        Engine(path, dtype="int4")
