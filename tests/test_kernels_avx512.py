"""The avx512 kernel path: its int8, f32 and bf16 matmuls against the scalar
reference, their one arithmetic for any number of tokens, any block of rows and
any thread count (bit for bit), and the engine end to end under
SHORTRT_KERNELS=avx512.

The comparisons with the reference use the tolerance of tests/test_kernels.py
(1e-5 of sum|w_i x_i|); everything within the avx512 path is compared bitwise.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shortrt import _C

pytestmark = pytest.mark.skipif("avx512" not in _C.kernel_paths(),
                                reason="CPU or OS lacks AVX-512 F/BW/VL/DQ/VNNI")

DOT_RTOL = 1e-5
# (rows, blocks of 32 columns): block counts that leave 0..3 blocks for the last
# quad (1, 2, 7, 12, 13, 18 = the default model's 576 columns, 19, 48), and rows
# longer than one 48-block chunk of prepared x (65, 131).
Q8_SHAPES = [(1, 1), (3, 2), (11, 7), (4, 12), (6, 13), (5, 18), (37, 19), (50, 48), (9, 65), (21, 131)]
# (rows, cols) of the f32/bf16 matmuls: column counts below, at and around the
# 16-lane vector (the last one masked), attention's head_dim (64) and a model's
# widths (576, 1536).
DENSE_SHAPES = [(1, 1), (3, 15), (5, 16), (7, 17), (33, 64), (9, 100), (50, 576), (13, 1536)]


@pytest.fixture
def rng():
    return np.random.default_rng(512)


def problem(rng, rows, blocks, n_tokens):
    w = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    x = (rng.standard_normal((n_tokens, 32 * blocks)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    return w, x


def dequantized(a):
    scales, q = _C.quantize_q8(np.ascontiguousarray(a).ravel(), "ref")
    return (scales[:, None].astype(np.float64) * q).reshape(a.shape)


@pytest.mark.parametrize("rows, blocks", Q8_SHAPES)
@pytest.mark.parametrize("n_tokens", [1, 2, 7, 8, 9, 17, 50])
def test_q8_matmul_equals_reference(rng, rows, blocks, n_tokens):
    w, x = problem(rng, rows, blocks, n_tokens)
    scale = np.abs(dequantized(x)) @ np.abs(dequantized(w)).T
    ref = _C.kernel_matmul(w, x, "q8", "ref")
    got = _C.kernel_matmul(w, x, "q8", "avx512", threads=2)
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= DOT_RTOL * scale + 1e-30), f"max error {(err / scale).max():.2e} of sum|w x|"


@pytest.mark.parametrize("rows, blocks", [(37, 19), (6, 13), (50, 48), (9, 131)])
def test_q8_matmul_gives_the_same_bits_for_any_number_of_tokens(rng, rows, blocks):
    # matmul hands the kernel decode row chunks (1 token) or 64-token tiles, so
    # n tokens reach it in groups of every size from 1 to 64.
    w, x = problem(rng, rows, blocks, 64)
    full = _C.kernel_matmul(w, x, "q8", "avx512", threads=2)
    for n in range(1, 65):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[:n], "q8", "avx512"), full[:n], err_msg=f"{n} tokens")
    for t in range(64):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[t:t + 1], "q8", "avx512")[0], full[t])


@pytest.mark.parametrize("blocks", [18, 19, 131])
@pytest.mark.parametrize("n_tokens", [1, 5, 48, 61])
def test_q8_matmul_gives_the_same_bits_for_any_block_of_rows(rng, blocks, n_tokens):
    w, x = problem(rng, 101, blocks, n_tokens)
    full = _C.kernel_matmul(w, x, "q8", "avx512", threads=1)
    for begin, end in [(0, 1), (1, 2), (3, 20), (17, 101), (50, 99), (100, 101)]:
        np.testing.assert_array_equal(_C.kernel_matmul(w[begin:end], x, "q8", "avx512"), full[:, begin:end])
    for threads in (2, 3):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x, "q8", "avx512", threads=threads), full)


@pytest.mark.parametrize("blocks", [1, 2, 13, 19, 65])
def test_dot_q8_q8_is_the_matmul_of_one_row_and_one_token(rng, blocks):
    w, x = problem(rng, 1, blocks, 1)
    ws, wq = _C.quantize_q8(w.ravel(), "ref")
    xs, xq = _C.quantize_q8(x.ravel(), "ref")
    dot = _C.kernel_dot_q8_q8(ws, wq, xs, xq, "avx512")
    assert np.float32(dot) == _C.kernel_matmul(w, x, "q8", "avx512")[0, 0]


def test_q8_extreme_values_stay_exact(rng):
    # All +-127 (every product at its largest) and exact zeros: the integer block
    # sums must neither saturate nor be thrown off by the +128 offset.
    w = np.where(rng.random((7, 32 * 9)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = np.where(rng.random((5, 32 * 9)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[1] = 0.0
    w[2, :32] = 0.0
    exact = x.astype(np.float64) @ w.T  # +-1 quantizes to +-127 * (1/127): nearly exact
    ref = _C.kernel_matmul(w, x, "q8", "ref")
    bound = DOT_RTOL * np.abs(x) @ np.abs(w).T
    assert np.all(np.abs(ref - exact) <= bound)
    assert np.all(np.abs(_C.kernel_matmul(w, x, "q8", "avx512") - ref) <= bound)
    assert np.all(_C.kernel_matmul(w, x, "q8", "avx512")[1] == 0)


# ---- f32 / bf16 ---------------------------------------------------------------------

def dense_truth_scale(w, x, wtype):
    wv = w.astype(np.float64)
    if wtype == "bf16":
        wv = (_C.pack_bf16(w.ravel()).astype(np.uint32) << 16).view(np.float32).reshape(w.shape).astype(np.float64)
    return np.abs(x.astype(np.float64)) @ np.abs(wv).T


@pytest.mark.parametrize("wtype", ["f32", "bf16"])
@pytest.mark.parametrize("rows, cols", DENSE_SHAPES)
@pytest.mark.parametrize("n_tokens", [1, 2, 5, 8, 9, 17, 67])
def test_dense_matmul_equals_reference(rng, wtype, rows, cols, n_tokens):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
    ref = _C.kernel_matmul(w, x, wtype, "ref")  # float64 sums of the same products
    got = _C.kernel_matmul(w, x, wtype, "avx512", threads=2)
    err = np.abs(got.astype(np.float64) - ref)
    scale = dense_truth_scale(w, x, wtype)
    assert np.all(err <= DOT_RTOL * scale + 1e-30), f"max error {(err / scale).max():.2e} of sum|w x|"


@pytest.mark.parametrize("wtype", ["f32", "bf16"])
@pytest.mark.parametrize("rows, cols", [(37, 17), (50, 576), (9, 1536)])
def test_dense_matmul_gives_the_same_bits_for_any_number_of_tokens(rng, wtype, rows, cols):
    # 1..4 tokens stream rows, more run in 6 x 4 tiles of 64-token blocks: every
    # count from 1 to 70 must give each token the bits it gets alone.
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((70, cols)).astype(np.float32)
    full = _C.kernel_matmul(w, x, wtype, "avx512", threads=2)
    for n in range(1, 71):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[:n], wtype, "avx512"), full[:n], err_msg=f"{n} tokens")
    for t in range(70):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[t:t + 1], wtype, "avx512")[0], full[t])


@pytest.mark.parametrize("wtype", ["f32", "bf16"])
@pytest.mark.parametrize("n_tokens", [1, 7, 48, 61])
def test_dense_matmul_gives_the_same_bits_for_any_block_of_rows(rng, wtype, n_tokens):
    w = rng.standard_normal((101, 99)).astype(np.float32)
    x = rng.standard_normal((n_tokens, 99)).astype(np.float32)
    full = _C.kernel_matmul(w, x, wtype, "avx512", threads=1)
    for begin, end in [(0, 1), (1, 2), (3, 20), (17, 101), (50, 99), (100, 101)]:
        np.testing.assert_array_equal(_C.kernel_matmul(w[begin:end], x, wtype, "avx512"), full[:, begin:end])
    for threads in (2, 3):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x, wtype, "avx512", threads=threads), full)


def engine_results(path_name, model_dir):
    """Logits (prefill and one-token chunks) and greedy tokens alone and batched, for
    fp32/bf16/int8, in a fresh process with SHORTRT_KERNELS=path_name."""
    script = r"""
import json, sys
from shortrt.engine import Engine
ids = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4]
out = {f"{d}/{c}": Engine(sys.argv[1], dtype=d).logits(ids, chunk=c).tolist()
       for d in ("fp32", "bf16", "int8") for c in (0, 1)}
prompts = [ids[:5], ids[3:14], ids[7:9], ids]
def run(eng, group):
    rids = {eng.submit(prompts[k], max_new_tokens=8, stop=[]): k for k in group}
    toks = {k: [] for k in group}
    while eng.has_work:
        for rid, tok, _ in eng.step():
            if tok >= 0:
                toks[rids[rid]].append(tok)
    return toks
for d in ("fp32", "bf16", "int8"):
    eng = Engine(sys.argv[1], dtype=d, max_batch=4, prefill_chunk=4)
    batched = run(eng, range(4))
    alone = {k: run(eng, [k])[k] for k in range(4)}
    out[f"batched/{d}"] = [batched[k] for k in range(4)]
    out[f"alone/{d}"] = [alone[k] for k in range(4)]
from shortrt import _C
out["active"] = _C.kernel_active()
print(json.dumps(out))
"""
    env = dict(os.environ, SHORTRT_KERNELS=path_name)
    proc = subprocess.run([sys.executable, "-c", script, str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_engine_on_avx512_matches_the_reference_and_batches_bit_for_bit(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from runtime_models import make_tiny, rel_err

    model_dir, _ = make_tiny(tmp_path / "m", num_hidden_layers=3)
    fast, ref = engine_results("avx512", model_dir), engine_results("ref", model_dir)
    assert fast["active"] == "avx512" and ref["active"] == "ref"
    for key in (f"{d}/{c}" for d in ("fp32", "bf16", "int8") for c in (0, 1)):
        assert rel_err(np.array(fast[key]), np.array(ref[key])) <= 1e-4, key
    for d in ("fp32", "bf16", "int8"):
        assert fast[f"batched/{d}"] == fast[f"alone/{d}"], d
        assert all(len(t) == 8 for t in fast[f"batched/{d}"])
