"""The avx512bf16 kernel path: bf16 weights times activations rounded to bf16 (once per
matmul input) on vdpbf16ps.

Its oracle is the scalar twin "bf16dp-twin" (csrc/kernels_bf16dp_ref.cpp), plain C++ that
does what Intel's pseudocode of vdpbf16ps and vcvtneps2bf16 specifies (odd pair first,
each addition rounded to nearest even, denormal inputs as zero, denormal results
flushed): the kernel must give its bits. Against the fp32-activation reference the error
is bounded by the activation rounding, 2^-9 relative per element. Within the path every
result is compared bitwise across token counts, row blocks and thread counts.
"""
import os
import sys

import numpy as np
import pytest

from shortrt import _C

pytestmark = pytest.mark.skipif("avx512bf16" not in _C.kernel_paths(),
                                reason="CPU lacks AVX512_BF16 (or the avx512 path's AVX-512 F/BW/VL/DQ/VNNI)")

# (rows, cols): columns below, at and around the 32 bf16 of one vdpbf16ps (the last
# vector masked, odd counts leaving half a pair), head_dim-like 64 and the model's widths.
SHAPES = [(1, 1), (3, 15), (5, 31), (7, 32), (4, 33), (33, 64), (9, 100), (50, 576), (13, 1536)]
TOKENS = [1, 2, 3, 5, 8, 9, 17, 67]


@pytest.fixture
def rng():
    return np.random.default_rng(1616)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def widened(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


# ---- activation rounding ---------------------------------------------------------------

def special_floats():
    u = np.array([0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x00400000,  # zeros, denormals
                  0x00800000, 0x80800000, 0x7f7fffff, 0xff7fffff,  # smallest and largest normals
                  0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffa00000,  # infinities, NaNs
                  0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff,  # ties to even both ways, just above/below
                  0x3f800000, 0xbf800000], dtype=np.uint32)
    return u.view(np.float32)


def test_activation_rounding_is_vcvtneps2bf16():
    x = special_floats()
    got = _C.round_bf16(x, "avx512bf16")
    np.testing.assert_array_equal(got, _C.round_bf16(x, "bf16dp-twin"))
    expected = {0x00000000: 0x0000, 0x80000000: 0x8000, 0x00000001: 0x0000, 0x807fffff: 0x8000, 0x00400000: 0,
                0x7f7fffff: 0x7f80, 0x3f808000: 0x3f80, 0x3f818000: 0x3f82, 0x3f808001: 0x3f81, 0x3f807fff: 0x3f80,
                0x7f800000: 0x7f80, 0xff800000: 0xff80, 0x3f800000: 0x3f80}
    for u, b in expected.items():
        i = int(np.nonzero(x.view(np.uint32) == u)[0][0])
        assert got[i] == b, f"{u:#010x} -> {got[i]:#06x}, expected {b:#06x}"
    nan = np.isnan(x)
    assert np.all(np.isnan(widened(got[nan])))  # NaN stays NaN
    # Unlike pack_bf16 (the weights' packing), denormals go to zero.
    assert _C.pack_bf16(np.array([0x00400000], np.uint32).view(np.float32))[0] == 0x0040


def test_activation_rounding_matches_the_twin_on_random_bits(rng):
    x = rng.integers(0, 2**32, 100_003, dtype=np.uint64).astype(np.uint32).view(np.float32)  # odd length: masked tail
    np.testing.assert_array_equal(_C.round_bf16(x, "avx512bf16"), _C.round_bf16(x, "bf16dp-twin"))


def test_only_paths_that_round_activations_offer_it():
    with pytest.raises(ValueError, match="kernel path 'avx512' has no bf16 activation rounding"):
        _C.round_bf16(np.ones(4, np.float32), "avx512")


# ---- the matmul ------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_matmul_equals_its_twin_bit_for_bit(rng, rows, cols, n_tokens):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = (rng.standard_normal((n_tokens, cols)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    got = _C.kernel_matmul(w, x, "bf16", "avx512bf16", threads=2)
    np.testing.assert_array_equal(bits(got), bits(_C.kernel_matmul(w, x, "bf16", "bf16dp-twin")))


def test_matmul_equals_its_twin_on_denormals_and_underflow(rng):
    # Weights whose bf16 are denormal (pack_bf16 keeps them; the instruction reads them as
    # zero), activations that round to denormals (flushed), and products and partial sums
    # that fall below 2^-126 (each flushed to zero): the twin must model all three.
    rows, cols = 9, 96
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0] *= np.float32(1e-39)
    w[1] *= np.float32(1e-20)
    w[2, ::3] = np.float32(3e-39)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    x[0] *= np.float32(1e-39)
    x[1] *= np.float32(1e-19)
    x[2, 1::2] = np.float32(-2e-39)
    got = _C.kernel_matmul(w, x, "bf16", "avx512bf16")
    twin = _C.kernel_matmul(w, x, "bf16", "bf16dp-twin")
    np.testing.assert_array_equal(bits(got), bits(twin))
    assert np.all(got[:, 0] == 0) and np.all(got[0] == 0)  # denormal operands count as zero
    assert np.all(got[1, 1] == 0)  # 1e-19 x 1e-20: every product below 2^-126, flushed
    fp32_act = _C.kernel_matmul(w, x, "bf16", "ref")
    assert np.any(fp32_act[1, 1] != 0)  # the fp32-activation path keeps those tiny sums


def test_matmul_propagates_nan_and_infinity(rng):
    w = rng.standard_normal((3, 40)).astype(np.float32)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    x[0, 5] = np.nan
    x[1, 7] = np.inf
    got = _C.kernel_matmul(w, x, "bf16", "avx512bf16")
    assert np.all(np.isnan(got[0]))
    assert np.all(np.isinf(got[1]) | np.isnan(got[1]))


@pytest.mark.parametrize("rows, cols", [(5, 31), (50, 576), (13, 1536)])
def test_matmul_is_within_the_activation_rounding_of_the_reference(rng, rows, cols):
    # |bf16(x) - x| <= 2^-9 |x| per element, so the result moves by at most
    # 2^-9 sum|w x|, plus the float sums' own rounding.
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((20, cols)).astype(np.float32)
    wv = widened(_C.pack_bf16(w.ravel())).reshape(w.shape).astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ np.abs(wv).T
    err = np.abs(_C.kernel_matmul(w, x, "bf16", "avx512bf16").astype(np.float64) - _C.kernel_matmul(w, x, "bf16", "ref"))
    assert np.all(err <= (2.0**-9 + cols * 2.0**-24) * scale + 1e-30)
    assert err.max() > 0  # the activations really were rounded


@pytest.mark.parametrize("rows, cols", [(37, 17), (50, 576), (9, 1536)])
def test_matmul_gives_the_same_bits_for_any_number_of_tokens(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((70, cols)).astype(np.float32)
    full = _C.kernel_matmul(w, x, "bf16", "avx512bf16", threads=2)
    for n in range(1, 71):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[:n], "bf16", "avx512bf16"), full[:n], err_msg=f"{n} tokens")
    for t in range(70):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[t:t + 1], "bf16", "avx512bf16")[0], full[t])


@pytest.mark.parametrize("n_tokens", [1, 7, 48, 61])
def test_matmul_gives_the_same_bits_for_any_block_of_rows_and_threads(rng, n_tokens):
    w = rng.standard_normal((101, 99)).astype(np.float32)
    x = rng.standard_normal((n_tokens, 99)).astype(np.float32)
    full = _C.kernel_matmul(w, x, "bf16", "avx512bf16", threads=1)
    for begin, end in [(0, 1), (1, 2), (3, 20), (17, 101), (50, 99), (100, 101)]:
        np.testing.assert_array_equal(_C.kernel_matmul(w[begin:end], x, "bf16", "avx512bf16"), full[:, begin:end])
    for threads in (2, 3):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x, "bf16", "avx512bf16", threads=threads), full)


@pytest.mark.parametrize("wtype", ["f32", "q8"])
def test_other_weight_types_are_the_avx512_kernels(rng, wtype):
    w = rng.standard_normal((40, 576)).astype(np.float32)
    x = rng.standard_normal((9, 576)).astype(np.float32)
    np.testing.assert_array_equal(bits(_C.kernel_matmul(w, x, wtype, "avx512bf16")),
                                  bits(_C.kernel_matmul(w, x, wtype, "avx512")))


# ---- the engine ------------------------------------------------------------------------

def test_engine_on_avx512bf16_batches_bit_for_bit_and_stays_near_the_reference(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from runtime_models import make_tiny, rel_err
    from test_kernels_avx512 import engine_results

    model_dir, _ = make_tiny(tmp_path / "m", num_hidden_layers=3)
    fast, avx512, ref = (engine_results(p, model_dir) for p in ("avx512bf16", "avx512", "ref"))
    assert fast["active"] == "avx512bf16"
    for d in ("fp32", "bf16", "int8"):
        assert fast[f"batched/{d}"] == fast[f"alone/{d}"], d  # one sequence in a batch = alone, bitwise
        assert all(len(t) == 8 for t in fast[f"batched/{d}"])
    for c in (0, 1):
        for d in ("fp32", "int8"):  # only bf16 weights change kernels
            assert fast[f"{d}/{c}"] == avx512[f"{d}/{c}"], d
        err = rel_err(np.array(fast[f"bf16/{c}"]), np.array(ref[f"bf16/{c}"]))
        assert 0 < err <= 2e-2, err  # activations in bf16: 2^-9 per element, through 3 layers
