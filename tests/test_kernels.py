"""The C++ kernels: every fast kernel against its scalar reference twin, the
reference against numpy, the thread pool, and the kernel-path dispatch.

Tolerances are stated per test. Dot products are compared relative to
sum|a_i * b_i| (the scale of the rounding error of any summation order), not
to the result, which may cancel to near zero.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shortrt import _C

HAS_AVX2 = "avx2" in _C.kernel_paths()
HAS_AVX512 = "avx512" in _C.kernel_paths()
BEST_PATH = "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "ref"  # what "auto" picks
FAST_PATHS = [
    pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="CPU lacks AVX2/FMA/F16C")),
    pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512, reason="CPU or OS lacks AVX-512 F/BW/VL/DQ/VNNI")),
]
ALL_PATHS = [pytest.param("ref")] + FAST_PATHS
WEIGHT_TYPES = ["f32", "bf16", "q8"]
ODD_LENGTHS = [1, 7, 8, 33, 577, 1537]
ODD_BLOCK_COUNTS = [1, 3, 17, 49]  # q8 lengths are multiples of 32

# A dot product over n terms summed in float: n * 2^-24 bounds the relative
# rounding error of a sequential sum; 8 lanes and a tree shorten the chains.
DOT_RTOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def bf16_round(x):
    """Round float32 to bf16 (nearest, ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize_q8_numpy(x):
    """The q8 definition: per 32 values, scale = max|x| / 127, q = round-half-even(x / scale)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    return scales, q


def dequantized(x):
    scales, q = quantize_q8_numpy(x)
    return (scales[:, None].astype(np.float64) * q).reshape(np.shape(x))


def assert_dot_close(actual, expected, scale, rtol=DOT_RTOL):
    """|actual - expected| <= rtol * scale elementwise, scale = sum|a_i * b_i|."""
    actual, expected, scale = (np.asarray(v, dtype=np.float64) for v in (actual, expected, scale))
    err = np.abs(actual - expected)
    bound = rtol * scale + 1e-30
    assert np.all(err <= bound), f"max error {err.max():.3g} > bound {bound.flat[np.argmax(err - bound)]:.3g}"


# ---- packing ------------------------------------------------------------------


def test_pack_bf16_rounds_to_nearest_even(rng):
    halfway_even = np.array([0x3F808000], dtype=np.uint32).view(np.float32)  # tie -> 0x3F80 (even)
    halfway_odd = np.array([0x3F818000], dtype=np.uint32).view(np.float32)  # tie -> 0x3F82 (even)
    above_half = np.array([0x3F808001], dtype=np.uint32).view(np.float32)  # -> 0x3F81
    x = np.concatenate([halfway_even, halfway_odd, above_half, rng.standard_normal(1001).astype(np.float32)])
    bits = _C.pack_bf16(x)
    assert bits.dtype == np.uint16
    assert list(bits[:3]) == [0x3F80, 0x3F82, 0x3F81]
    np.testing.assert_array_equal(bf16_bits_to_f32(bits), bf16_round(x))


def test_pack_bf16_keeps_inf_and_nan():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    out = bf16_bits_to_f32(_C.pack_bf16(x))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert out[3] == 0.0 and np.signbit(out[4])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_quantize_q8_matches_definition(rng, path):
    x = (rng.standard_normal(32 * 49) * rng.uniform(0.01, 10, 32 * 49)).astype(np.float32)
    x[:32] = 0.0  # an all-zero block: scale 0, q 0
    scales, q = _C.quantize_q8(x, path)
    ref_scales, ref_q = quantize_q8_numpy(x)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(q, ref_q)
    assert np.abs(q).max() == 127


@pytest.mark.parametrize("path", ALL_PATHS)
def test_dequantize_q8_error_is_at_most_half_a_step(rng, path):
    x = rng.standard_normal(32 * 17).astype(np.float32)
    scales, q = _C.quantize_q8(x, path)
    err = np.abs(_C.dequantize_q8(scales, q) - x).reshape(-1, 32)
    assert np.all(err <= scales[:, None] * (0.5 + 1e-5))


def test_quantize_q8_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.quantize_q8(np.ones(33, dtype=np.float32), "ref")


# ---- vector ops: fast vs reference (and reference vs numpy) -------------------------


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_dot_f32_fast_equals_reference(rng, path, n):
    a, b = rng.standard_normal((2, n)).astype(np.float32)
    truth = np.dot(a.astype(np.float64), b)
    scale = np.abs(a.astype(np.float64) * b).sum()
    assert_dot_close(_C.kernel_dot_f32(a, b, "ref"), truth, scale, rtol=1e-7)
    assert_dot_close(_C.kernel_dot_f32(a, b, path), _C.kernel_dot_f32(a, b, "ref"), scale)


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_dot_bf16_f32_fast_equals_reference(rng, path, n):
    w, x = rng.standard_normal((2, n)).astype(np.float32)
    bits = _C.pack_bf16(w)
    wr = bf16_bits_to_f32(bits).astype(np.float64)
    scale = np.abs(wr * x).sum()
    assert_dot_close(_C.kernel_dot_bf16_f32(bits, x, "ref"), np.dot(wr, x), scale, rtol=1e-7)
    assert_dot_close(_C.kernel_dot_bf16_f32(bits, x, path), _C.kernel_dot_bf16_f32(bits, x, "ref"), scale)


@pytest.mark.parametrize("n_blocks", ODD_BLOCK_COUNTS)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_dot_q8_q8_fast_equals_reference(rng, path, n_blocks):
    w, x = rng.standard_normal((2, 32 * n_blocks)).astype(np.float32)
    ws, wq = _C.quantize_q8(w, "ref")
    xs, xq = _C.quantize_q8(x, "ref")
    block_sums = (wq.astype(np.int64) * xq).sum(axis=1)
    scale_products = (ws * xs).astype(np.float64)  # the kernels multiply the two scales in float
    terms = scale_products * block_sums
    ref = _C.kernel_dot_q8_q8(ws, wq, xs, xq, "ref")
    assert_dot_close(ref, terms.sum(), np.abs(terms).sum(), rtol=1e-7)
    assert_dot_close(_C.kernel_dot_q8_q8(ws, wq, xs, xq, path), ref, np.abs(terms).sum())


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_axpy(rng, path, n):
    x, y = rng.standard_normal((2, n)).astype(np.float32)
    a = np.float32(-0.37)
    out = _C.kernel_axpy(a, x, y, path)
    # One rounding of a*x and one of the sum (or one fused): within 2 ulp of the terms.
    np.testing.assert_array_less(np.abs(out - (y + np.float64(a) * x)), 2.5e-7 * (np.abs(a * x) + np.abs(y)) + 1e-30)
    assert not np.shares_memory(out, y)


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_rmsnorm(rng, path, n):
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    eps = 1e-5
    x64 = x.astype(np.float64)
    truth = x64 / np.sqrt(np.mean(x64 * x64) + eps) * weight
    np.testing.assert_allclose(_C.kernel_rmsnorm(x, weight, eps, path), truth, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_swiglu(rng, path, n):
    gate = (rng.standard_normal(n) * 6).astype(np.float32)
    up = rng.standard_normal(n).astype(np.float32)
    g = gate.astype(np.float64)
    truth = g / (1 + np.exp(-g)) * up
    # The avx2 exp is a polynomial (about 2 ulp); the division and products add a few more.
    np.testing.assert_allclose(_C.kernel_swiglu(gate, up, path), truth, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_softmax(rng, path, n):
    x = (rng.standard_normal(n) * 8 + 1000).astype(np.float32)  # large: must subtract the max
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max())
    out = _C.kernel_softmax(x, path)
    np.testing.assert_allclose(out, e / e.sum(), rtol=2e-6, atol=1e-12)
    assert abs(out.sum() - 1) < 1e-5


@pytest.mark.parametrize("path", ALL_PATHS)
def test_softmax_of_masked_scores_gives_zero_weight(path):
    x = np.array([0.5, -np.inf, 1.5, -np.inf, 0.0, -1e30, 2.0, 1.0, -np.inf], dtype=np.float32)
    out = _C.kernel_softmax(x, path)
    assert np.all(out[[1, 3, 5, 8]] < 1e-30)
    kept = x[[0, 2, 4, 6, 7]].astype(np.float64)
    np.testing.assert_allclose(out[[0, 2, 4, 6, 7]], np.exp(kept) / np.exp(kept).sum(), rtol=2e-6)


@pytest.mark.parametrize("n", ODD_LENGTHS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_sum(rng, path, n):
    x = rng.standard_normal(n).astype(np.float32)
    assert_dot_close(_C.kernel_sum(x, path), x.astype(np.float64).sum(), np.abs(x).sum())


# ---- matmul --------------------------------------------------------------------------

# (rows, cols, n_tokens): odd sizes that cross the 4-token and 3-row tiles, the
# 48-row and 64-token blocks, and leave column tails of 1..7.
DENSE_SHAPES = [(1, 1, 1), (5, 7, 2), (7, 33, 5), (49, 577, 3), (50, 1537, 67), (97, 96, 1)]
Q8_SHAPES = [(1, 32, 1), (5, 96, 2), (49, 544, 5), (50, 1568, 67), (97, 96, 1)]


def matmul_truth(w, x, wtype):
    """x @ w.T in float64 on the values the kernel sees (bf16-rounded w; q8-dequantized w and x)."""
    if wtype == "bf16":
        w = bf16_round(w)
    elif wtype == "q8":
        w, x = dequantized(w), dequantized(x)
    w, x = np.asarray(w, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return x @ w.T, np.abs(x) @ np.abs(w).T


def shapes_for(wtype):
    return Q8_SHAPES if wtype == "q8" else DENSE_SHAPES


def random_problem(rng, rows, cols, n_tokens):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
    return w, x


@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_reference_matmul_equals_numpy(rng, wtype):
    for rows, cols, n in shapes_for(wtype):
        w, x = random_problem(rng, rows, cols, n)
        truth, scale = matmul_truth(w, x, wtype)
        # The reference accumulates in double: only the final rounding to float remains.
        assert_dot_close(_C.kernel_matmul(w, x, wtype, "ref"), truth, scale, rtol=1e-7)


def test_q8_matmul_error_is_within_the_quantization_bound(rng):
    rows, cols, n = 33, 576, 5
    w, x = random_problem(rng, rows, cols, n)
    ws, _ = quantize_q8_numpy(w)
    xs, _ = quantize_q8_numpy(x)
    ws, xs = ws.reshape(rows, -1).astype(np.float64), xs.reshape(n, -1).astype(np.float64)
    abs_w = np.abs(w).reshape(rows, -1, 32).sum(axis=2)  # [rows, blocks]
    abs_x = np.abs(x).reshape(n, -1, 32).sum(axis=2)  # [n, blocks]
    # |wq xq - w x| <= |w| dx + |x| dw + dw dx per element, dw <= ws/2, dx <= xs/2.
    bound = abs_x @ (ws / 2).T + (xs / 2) @ abs_w.T + 32 * (xs / 2) @ (ws / 2).T
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    for path in _C.kernel_paths():
        err = np.abs(_C.kernel_matmul(w, x, "q8", path) - exact)
        assert np.all(err <= bound * (1 + 1e-5) + 1e-5), path
        assert err.max() > 0  # it really is quantized


@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_matmul_equals_reference(rng, path, wtype):
    for rows, cols, n in shapes_for(wtype):
        w, x = random_problem(rng, rows, cols, n)
        _, scale = matmul_truth(w, x, wtype)
        ref = _C.kernel_matmul(w, x, wtype, "ref")
        assert_dot_close(_C.kernel_matmul(w, x, wtype, path, threads=2), ref, scale)


@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_is_identical_for_1_2_3_threads(rng, path, wtype):
    rows, cols, n = (101, 96, 67) if wtype == "q8" else (101, 99, 67)
    w, x = random_problem(rng, rows, cols, n)
    for tokens in (x, x[:1]):  # prefill tiles and decode row chunks
        one = _C.kernel_matmul(w, tokens, wtype, path, threads=1)
        for threads in (2, 3):
            np.testing.assert_array_equal(_C.kernel_matmul(w, tokens, wtype, path, threads=threads), one)


@pytest.mark.parametrize("n_tokens", [3, 11, 40])  # row streaming for few tokens, tiles for many
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_of_many_tokens_equals_one_token_at_a_time(rng, path, wtype, n_tokens):
    # Batched decode and prefill must give the same bits as single-token decode.
    w, x = random_problem(rng, 53, 160, n_tokens)
    together = _C.kernel_matmul(w, x, wtype, path, threads=2)
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(together[t], _C.kernel_matmul(w, x[t : t + 1], wtype, path)[0])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_writes_only_its_rows_of_a_strided_output(rng, path):
    w, x = random_problem(rng, 9, 64, 6)
    y = _C.kernel_matmul(w, x, "f32", path, threads=2, out_stride=13)
    assert y.shape == (6, 13)
    assert np.all(np.isnan(y[:, 9:]))
    np.testing.assert_allclose(y[:, :9], x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_bad_input():
    w = np.ones((4, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.kernel_matmul(w, np.ones((2, 40), dtype=np.float32), "q8", "ref")
    with pytest.raises(ValueError, match="unknown weight type 'f16'"):
        _C.kernel_matmul(w, np.ones((2, 40), dtype=np.float32), "f16", "ref")
    with pytest.raises(ValueError, match="x has 39 columns, w has 40"):
        _C.kernel_matmul(w, np.ones((2, 39), dtype=np.float32), "f32", "ref")
    with pytest.raises(ValueError, match="unknown kernel path 'sse9'"):
        _C.kernel_matmul(w, np.ones((2, 40), dtype=np.float32), "f32", "sse9")


# ---- thread pool -----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, grain", [(0, 1), (1, 1), (7, 3), (1000, 1), (1000, 64), (5, 100)])
def test_parallel_for_covers_every_item_once_in_chunks_of_at_most_grain(threads, n, grain):
    visits, largest_chunk = _C.threadpool_visits(n, grain, threads, repeats=50)
    np.testing.assert_array_equal(visits, np.full(n, 50))
    assert largest_chunk <= grain


def test_parallel_for_survives_many_quick_jobs():
    # Thousands of tiny jobs race workers that join late against the caller closing the job.
    visits, _ = _C.threadpool_visits(8, 1, 3, repeats=3000)
    np.testing.assert_array_equal(visits, np.full(8, 3000))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_for_rethrows_and_stays_usable(threads):
    with pytest.raises(ValueError, match="item 37 failed; pool then covered 100 items"):
        _C.threadpool_throw_at(100, threads, 37)


# ---- dispatch ------------------------------------------------------------------------------


def active_path_in_subprocess(env_value):
    """kernel_active() in a fresh process with SHORTRT_KERNELS=env_value (None: unset).

    Loads the extension file directly so the check does not pay for importing
    the whole package."""
    script = textwrap.dedent(
        f"""
        import importlib.machinery, importlib.util
        loader = importlib.machinery.ExtensionFileLoader("_C", {_C.__file__!r})
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_C", loader))
        loader.exec_module(module)
        try:
            print("path:" + module.kernel_active())
        except Exception as e:
            print("error:" + type(e).__name__ + ":" + str(e))
        """
    )
    env = dict(os.environ)
    env.pop("SHORTRT_KERNELS", None)
    if env_value is not None:
        env["SHORTRT_KERNELS"] = env_value
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_environment_variable_forces_the_kernel_path():
    assert active_path_in_subprocess("ref") == "path:ref"
    assert active_path_in_subprocess(None) == "path:" + BEST_PATH
    assert active_path_in_subprocess("auto") == "path:" + BEST_PATH
    if HAS_AVX2:
        assert active_path_in_subprocess("avx2") == "path:avx2"
    else:
        assert "lacks AVX2" in active_path_in_subprocess("avx2")
    if HAS_AVX512:
        assert active_path_in_subprocess("avx512") == "path:avx512"
    else:
        out = active_path_in_subprocess("avx512")
        assert out.startswith("error:ValueError:") and "lacks AVX512F, BW, VL, DQ or VNNI" in out
    if "avx512bf16" in _C.kernel_paths():
        assert active_path_in_subprocess("avx512bf16") == "path:avx512bf16"
    else:
        assert "lacks AVX512_BF16" in active_path_in_subprocess("avx512bf16")


def test_unknown_environment_value_is_a_clear_error():
    out = active_path_in_subprocess("fastest")
    assert out.startswith("error:ValueError:")
    assert ("SHORTRT_KERNELS: unknown kernel path 'fastest' (expected 'ref', 'avx2', 'avx512', 'avx512bf16', 'amx' "
            "or 'auto')") in out


def test_set_kernels_switches_and_rejects_unknown_names():
    before = _C.kernel_active()
    try:
        _C.set_kernels("ref")
        assert _C.kernel_active() == "ref"
        _C.set_kernels("auto")
        assert _C.kernel_active() == BEST_PATH
        for path in _C.kernel_paths():
            _C.set_kernels(path)
            assert _C.kernel_active() == path
        with pytest.raises(ValueError, match="unknown kernel path 'avx1024'"):
            _C.set_kernels("avx1024")
    finally:
        _C.set_kernels(before)
