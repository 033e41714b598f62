"""int4 weights (BlockQ4: 32 weights, value = d * q + m, d and m fp16): the fp16
conversion, the packing rule and its exactness on weights already on a Q4_1
grid (gguf's own quantizer, and the default model's 210 layer matrices), and
the int4 x q8 matmul on every kernel path.

Tolerances: the reference accumulates in double, so it matches numpy on the
dequantized operands to 1e-7 of sum|w_i x_i|; fast paths match the reference to
1e-5 of sum|w_i x_i| (tests/test_kernels.py's DOT_RTOL). Within a path,
results are compared bitwise (any thread count, any number of tokens, any block
of rows), and avx2 and avx512 bitwise with each other (kernels_q4.h: one
arithmetic on identical int32 block sums).
"""
import numpy as np
import pytest

from shortrt import _C
from test_kernels import ALL_PATHS, DOT_RTOL, FAST_PATHS, HAS_AVX2, HAS_AVX512, assert_dot_close, dequantized


@pytest.fixture
def rng():
    return np.random.default_rng(4)


def quantize_q4_numpy(x):
    """The packing rule (kernels_q4.h) in numpy: m = fp16(min), d = fp16((max - min) / 15),
    q = clip(round_half_even((x - m) / d), 0, 15), in float32."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    m16 = lo.astype(np.float16)
    d16 = ((hi - lo) / np.float32(15)).astype(np.float32).astype(np.float16)
    m, d = m16.astype(np.float32), d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] != 0, np.rint((blocks - m[:, None]) / d[:, None]), 0)
    return d16.view(np.uint16), m16.view(np.uint16), np.clip(q, 0, 15).astype(np.uint8)


def dequantized_q4(w):
    return _C.dequantize_q4(*_C.quantize_q4(np.ascontiguousarray(w, dtype=np.float32).ravel())).reshape(w.shape)


def q4_problem(rng, rows, cols, n_tokens):
    # Offsets per row so the minimum term matters (weights not centred on zero).
    w = (rng.standard_normal((rows, cols)) + rng.uniform(-1, 1, (rows, 1))).astype(np.float32)
    x = (rng.standard_normal((n_tokens, cols)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    return w, x


def truth(w, x):
    """x @ w.T in float64 on what the kernel sees (int4-dequantized w, q8-dequantized x) and sum|w x|."""
    wd, xd = dequantized_q4(w).astype(np.float64), dequantized(x)
    return xd @ wd.T, np.abs(xd) @ np.abs(wd).T


# ---- fp16 -------------------------------------------------------------------------------


def test_fp16_conversion_matches_numpy_for_every_half_and_random_floats(rng):
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    got = _C.f16_to_f32(halves)
    finite = ~np.isnan(ref)
    np.testing.assert_array_equal(got.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    assert np.isnan(got[~finite]).all()
    # Normals, subnormals, ties, overflow to Inf, and the round trip of every finite half.
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 13, 200_000))).astype(np.float32)
    x = np.concatenate([x, ref[finite], [65504.0, 65519.99, 65520.0, 1e9, -0.0]]).astype(np.float32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(_C.f32_to_f16(x), x.astype(np.float16).view(np.uint16))


# ---- packing ----------------------------------------------------------------------------


def test_packing_follows_the_stated_rule(rng):
    x = (rng.standard_normal(32 * 500) * rng.uniform(0.01, 10, 32 * 500)).astype(np.float32)
    x[:32] = 0.25  # a constant block: d = 0, every q = 0, value = m
    d, m, q = _C.quantize_q4(x)
    ref_d, ref_m, ref_q = quantize_q4_numpy(x)
    np.testing.assert_array_equal(d, ref_d)
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_array_equal(q, ref_q)
    assert d[0] == 0 and not q[0].any() and np.all(_C.dequantize_q4(d, m, q)[:32] == 0.25)


def test_off_grid_error_is_at_most_about_half_a_step(rng):
    x = rng.standard_normal(32 * 400).astype(np.float32)
    d, m, q = _C.quantize_q4(x)
    err = np.abs(_C.dequantize_q4(d, m, q) - x).reshape(-1, 32)
    step = _C.f16_to_f32(d)[:, None]
    blocks = x.reshape(-1, 32)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    # Inside the grid [m, m + 15 d] the nearest level is within half a step; the fp16
    # rounding of m and d can leave the block's ends just outside it.
    m = _C.f16_to_f32(m)[:, None]
    slack = np.abs(m - lo) + np.abs(m + 15 * step - hi)
    assert np.all(err <= (step / 2 + slack) * (1 + 1e-6) + 1e-7)
    assert err.max() > 0


def test_weights_on_a_q4_1_grid_come_back_bit_for_bit(rng):
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    x = (rng.standard_normal((64, 1024)) * rng.uniform(0.001, 3, (64, 1))
         + rng.uniform(-1, 1, (64, 1))).astype(np.float32)
    on_grid = gguf_quants.dequantize(gguf_quants.quantize(x, GGMLQuantizationType.Q4_1),
                                     GGMLQuantizationType.Q4_1).astype(np.float32)
    back = dequantized_q4(on_grid)
    np.testing.assert_array_equal(back.view(np.uint32), on_grid.view(np.uint32))


@pytest.mark.slow
def test_default_model_layers_are_reproduced_exactly(default_model):
    # The default model's 210 layer matrices were shipped as llama.cpp Q4_1; its token
    # embedding (the tied LM head) as Q8_0, so that one is off the int4 grid.
    from safetensors import safe_open

    exact = total = 0
    with safe_open(str(default_model.path / "model.safetensors"), "numpy") as f:
        layers = [k for k in f.keys() if k.startswith("model.layers.") and k.endswith("proj.weight")]
        assert len(layers) == 210
        for name in layers:
            t = f.get_tensor(name)
            back = dequantized_q4(t)
            exact += int((back.view(np.uint32) == t.view(np.uint32)).sum())
            total += t.size
        embed = f.get_tensor("model.embed_tokens.weight")
    assert exact == total
    assert not np.array_equal(dequantized_q4(embed[:256]), embed[:256])


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        _C.quantize_q4(np.ones(33, dtype=np.float32))
    bad = np.ones(64, dtype=np.float32)
    bad[40] = np.nan
    with pytest.raises(ValueError, match="cannot hold NaN/Inf"):
        _C.quantize_q4(bad)
    big = np.zeros(32, dtype=np.float32)
    big[3] = 2e6
    with pytest.raises(ValueError, match="beyond what an fp16 minimum and step can hold"):
        _C.quantize_q4(big)
    with pytest.raises(ValueError, match="levels must be in 0..15"):
        _C.dequantize_q4(np.zeros(1, np.uint16), np.zeros(1, np.uint16), np.full((1, 32), 16, np.uint8))


def test_interleaved_layout_is_the_documented_regrouping(rng):
    # kernels.h, BlockQ4x16: per group of 16 rows and block column b: d[16], m[16] (fp16), then
    # qs[p][i] = bytes 4p..4p+3 of row i's nibbles, p = 0..3; rows past the last are zero.
    for rows, cols in [(16, 64), (37, 96), (1, 32)]:
        w, _ = q4_problem(rng, rows, cols, 1)
        d, m, q = _C.quantize_q4(w.ravel())
        nb, groups = cols // 32, -(-rows // 16)
        packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)  # BlockQ4::qs: weight j low, j + 16 high
        pad = groups * 16 - rows
        d = np.concatenate([d.reshape(rows, nb), np.zeros((pad, nb), np.uint16)])
        m = np.concatenate([m.reshape(rows, nb), np.zeros((pad, nb), np.uint16)])
        packed = np.concatenate([packed.reshape(rows, nb, 16), np.zeros((pad, nb, 16), np.uint8)])
        want = bytearray()
        for g in range(groups):
            for b in range(nb):
                rs = slice(16 * g, 16 * g + 16)
                want += d[rs, b].astype("<u2").tobytes() + m[rs, b].astype("<u2").tobytes()
                want += packed[rs, b].reshape(16, 4, 4).transpose(1, 0, 2).tobytes()  # [p][row][4 bytes]
        got = _C.q4_interleaved(w)
        assert got.tobytes() == bytes(want), (rows, cols)


# ---- matmul -----------------------------------------------------------------------------

# (rows, cols, n_tokens): partial and whole 16-row groups, token counts across the tiles of each
# path (avx512: 8 tokens, avx2: 3) and the 48-row / 64-token blocks, with odd block counts.
Q4_SHAPES = [(1, 32, 1), (5, 96, 2), (49, 544, 5), (50, 1568, 67), (97, 96, 1), (8, 576, 13), (32, 64, 9),
             (16, 96, 8), (24, 160, 17)]


def test_reference_matmul_equals_numpy(rng):
    for rows, cols, n in Q4_SHAPES:
        w, x = q4_problem(rng, rows, cols, n)
        exact, scale = truth(w, x)
        assert_dot_close(_C.kernel_matmul(w, x, "q4", "ref"), exact, scale, rtol=1e-7)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_matmul_equals_reference(rng, path):
    for rows, cols, n in Q4_SHAPES:
        w, x = q4_problem(rng, rows, cols, n)
        _, scale = truth(w, x)
        ref = _C.kernel_matmul(w, x, "q4", "ref")
        assert_dot_close(_C.kernel_matmul(w, x, "q4", path, threads=2), ref, scale, rtol=DOT_RTOL)


@pytest.mark.skipif(not (HAS_AVX2 and HAS_AVX512), reason="needs both the avx2 and the avx512 path")
def test_avx2_and_avx512_give_the_same_bits(rng):
    for rows, cols, n in Q4_SHAPES:
        w, x = q4_problem(rng, rows, cols, n)
        np.testing.assert_array_equal(_C.kernel_matmul(w, x, "q4", "avx512", threads=2),
                                      _C.kernel_matmul(w, x, "q4", "avx2", threads=1))


def test_q4_matmul_error_is_within_the_quantization_bound(rng):
    rows, cols, n = 33, 576, 5
    w, x = q4_problem(rng, rows, cols, n)
    wd = dequantized_q4(w).astype(np.float64)
    xd = dequantized(x)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    # |wd xd - w x| <= sum |w - wd| |xd| + |w| |x - xd|, taken on the actual operands.
    bound = np.abs(xd) @ np.abs(w - wd).T + np.abs(x - xd) @ np.abs(w.astype(np.float64)).T
    for path in _C.kernel_paths():
        err = np.abs(_C.kernel_matmul(w, x, "q4", path) - exact)
        assert np.all(err <= bound * (1 + 1e-4) + 1e-4), path


@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_is_identical_for_1_2_3_threads(rng, path):
    w, x = q4_problem(rng, 101, 96, 67)
    for tokens in (x, x[:1]):  # prefill tiles and decode row chunks
        one = _C.kernel_matmul(w, tokens, "q4", path, threads=1)
        for threads in (2, 3):
            np.testing.assert_array_equal(_C.kernel_matmul(w, tokens, "q4", path, threads=threads), one)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_gives_the_same_bits_for_any_number_of_tokens(rng, path):
    # matmul hands the kernel 1-token row chunks (decode) or up to 48-token tiles.
    w, x = q4_problem(rng, 53, 160, 50)
    full = _C.kernel_matmul(w, x, "q4", path, threads=2)
    for n in (1, 2, 3, 4, 11, 12, 13, 14, 40, 49):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[:n], "q4", path), full[:n], err_msg=f"{n} tokens")
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[t:t + 1], "q4", path)[0], full[t])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_matmul_gives_the_same_bits_for_any_block_of_rows(rng, path):
    w, x = q4_problem(rng, 101, 192, 20)
    full = _C.kernel_matmul(w, x, "q4", path, threads=1)
    for begin, end in [(0, 1), (1, 2), (3, 20), (17, 101), (50, 99), (100, 101)]:
        np.testing.assert_array_equal(_C.kernel_matmul(w[begin:end], x, "q4", path), full[:, begin:end])


def test_matmul_rejects_a_partial_block():
    with pytest.raises(ValueError, match="q4 needs cols to be a multiple of 32"):
        _C.kernel_matmul(np.ones((4, 40), np.float32), np.ones((2, 40), np.float32), "q4", "ref")
