"""The decode attention kernel: AVX2 twin vs scalar reference vs numpy, on odd sizes."""
import numpy as np
import pytest

from shortrt import _C


def numpy_attention(q, keys, values, scale):
    hd = q.shape[0]
    s = keys[:, :hd].astype(np.float64) @ q * scale
    p = np.exp(s - s.max())
    return (p / p.sum()) @ values[:, :hd].astype(np.float64)


@pytest.mark.parametrize("n_keys", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("hd,stride", [(8, 8), (24, 40), (64, 192), (128, 128), (136, 150)])
def test_attend_head_paths_agree(n_keys, hd, stride):
    rng = np.random.default_rng(n_keys * 1000 + hd)
    q = rng.standard_normal(hd).astype(np.float32)
    keys = rng.standard_normal((n_keys, stride)).astype(np.float32) * 2
    values = rng.standard_normal((n_keys, stride)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    expected = numpy_attention(q, keys, values, scale)
    ref = _C.attend_head(q, keys, values, scale, "ref")
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-5)
    if "avx2" in _C.kernel_paths():
        np.testing.assert_allclose(_C.attend_head(q, keys, values, scale, "avx2"), ref, rtol=1e-5, atol=1e-6)


def test_attend_head_rejects_bad_shapes():
    q = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="head_dim % 8|no AVX2"):
        _C.attend_head(q, np.zeros((3, 12), np.float32), np.zeros((3, 12), np.float32), 1.0, "avx2")
    with pytest.raises(ValueError, match="stride >= hd"):
        _C.attend_head(q, np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32), 1.0, "ref")


@pytest.mark.parametrize("path", ["ref", "avx2"])
@pytest.mark.parametrize("group,n_keys", [(3, 1), (3, 65), (2, 200), (8, 70)])
def test_attend_group_equals_each_head_alone(path, group, n_keys):
    """Heads sharing a kv head run together; each gets exactly what it gets alone."""
    if path not in _C.kernel_paths():
        pytest.skip("no AVX2 on this CPU")
    rng = np.random.default_rng(group * 100 + n_keys)
    hd, stride = 64, 192
    q = rng.standard_normal((group, hd)).astype(np.float32)
    keys = rng.standard_normal((n_keys, stride)).astype(np.float32) * 2
    values = rng.standard_normal((n_keys, stride)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    together = _C.attend_head(q, keys, values, scale, path)
    assert together.shape == (group, hd)
    for g in range(group):
        np.testing.assert_array_equal(together[g], _C.attend_head(q[g], keys, values, scale, path))
        np.testing.assert_allclose(together[g], numpy_attention(q[g], keys, values, scale), rtol=1e-5, atol=1e-5)


def numpy_gqa(q, keys, values, n_kv):
    n_heads, hd = q.shape
    group = n_heads // n_kv
    out = np.empty((n_heads, hd))
    for h in range(n_heads):
        kv = h // group
        out[h] = numpy_attention(q[h], keys[:, kv * hd:(kv + 1) * hd], values[:, kv * hd:(kv + 1) * hd],
                                 1 / np.sqrt(hd))
    return out


@pytest.mark.parametrize("path", ["ref", "avx2"])
@pytest.mark.parametrize("n_keys", [1, 127, 128, 129, 300, 700])
@pytest.mark.parametrize("n_heads,n_kv,hd", [(9, 3, 64), (4, 4, 32), (20, 2, 16)])
def test_attention_decode_merges_key_ranges(path, n_keys, n_heads, n_kv, hd):
    """The engine's decode attention (key ranges on several threads, merged) against numpy;
    the same bits on 1 and 2 threads. (20 heads over 2 kv heads: groups of 10 split in two.)"""
    if path not in _C.kernel_paths():
        pytest.skip("no AVX2 on this CPU")
    rng = np.random.default_rng(n_keys * 7 + n_heads)
    q = rng.standard_normal((n_heads, hd)).astype(np.float32)
    keys = (rng.standard_normal((n_keys, n_kv * hd)) * 2).astype(np.float32)
    values = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    out = _C.attention_decode(q, keys, values, n_kv, path, threads=2)
    np.testing.assert_allclose(out, numpy_gqa(q, keys, values, n_kv), rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(out, _C.attention_decode(q, keys, values, n_kv, path, threads=1))


def test_attention_decode_rejects_bad_shapes():
    q = np.zeros((9, 64), np.float32)
    kv = np.zeros((5, 192), np.float32)
    with pytest.raises(ValueError, match="n_heads a multiple of n_kv_heads"):
        _C.attention_decode(q, kv, kv, 2, "ref")
    with pytest.raises(ValueError, match="n_kv_heads"):
        _C.attention_decode(q, np.zeros((5, 128), np.float32), np.zeros((5, 128), np.float32), 3, "ref")
    with pytest.raises(ValueError, match="path must be"):
        _C.attention_decode(q, kv, kv, 3, "gpu")
    with pytest.raises(ValueError, match="group must be"):
        _C.attend_head(np.zeros((9, 64), np.float32), kv, kv, 1.0, "ref")


# ---- compact KV cache (kv_dtype f16 / bf16 / int8) ----------------------------------------

KV_DTYPES = ["fp32", "f16", "bf16", "int8"]
PATHS = ["ref", "avx2", "avx512"]


def need_path(path):
    if path not in _C.kernel_paths():
        pytest.skip(f"this CPU has no {path} kernel path")


def numpy_f16_bits_to_f32(x):
    with np.errstate(over="ignore"):  # beyond 65504: infinity, as intended
        return x.astype(np.float16).astype(np.float32)


def test_kv_round_trip_f16_is_ieee_round_to_nearest_even():
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -70000.0, np.inf, -np.inf, 2.0**-14,
                        2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-25, 1e-8, -5.96e-8, 6.1e-5, 1 + 2.0**-11,
                        1 + 3 * 2.0**-11], np.float32)
    x = np.concatenate([special, (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 12, 4096))).astype(np.float32)])
    x = np.resize(x, (len(x) // 8 * 8,)).reshape(-1, 8)
    got = _C.kv_round_trip(x, "f16")
    np.testing.assert_array_equal(got, numpy_f16_bits_to_f32(x))  # bit for bit, signs of zero included
    assert np.array_equal(np.signbit(got), np.signbit(numpy_f16_bits_to_f32(x)))
    assert np.isnan(_C.kv_round_trip(np.full((1, 8), np.nan, np.float32), "f16")).all()


def test_kv_round_trip_bf16_and_int8():
    import torch

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 64)) * 3).astype(np.float32)
    x[5] = 0.0  # an all-zero row: scale 0, values 0
    bf16 = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # round to nearest even
    np.testing.assert_array_equal(_C.kv_round_trip(x, "bf16"), bf16)
    np.testing.assert_array_equal(_C.kv_round_trip(x, "fp32"), x)
    scale = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(x * inv), -127, 127)  # np.rint: half to even
    np.testing.assert_array_equal(_C.kv_round_trip(x, "int8"), (scale * q).astype(np.float32))
    assert (_C.kv_round_trip(x, "int8")[5] == 0).all()
    assert np.abs(_C.kv_round_trip(x, "int8") - x).max() <= np.abs(x).max() / 127 / 2 * 1.0001


def test_kv_row_bytes():
    assert [_C.kv_row_bytes(t, 64) for t in KV_DTYPES] == [256, 128, 128, 64 + 4]
    with pytest.raises(ValueError, match="unknown kv_dtype 'fp8' \\(expected fp32, f16, bf16 or int8\\)"):
        _C.kv_row_bytes("fp8", 64)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_keys,hd,stride,group", [(1, 64, 64, 3), (65, 64, 192, 3), (200, 128, 128, 2),
                                                   (70, 24, 40, 8), (129, 136, 150, 1)])
def test_attend_head_kv_dtypes(kv_dtype, path, n_keys, hd, stride, group):
    """Each kv dtype's decode kernel against numpy on the stored (rounded) keys and values, and
    the fast path against its reference twin: within 1e-5 (relative) / 1e-6 (absolute); the
    heads of a group each get exactly what they get alone."""
    need_path(path)
    if path != "ref" and hd % 8:
        pytest.skip("the SIMD paths take head_dim % 8 == 0 (the engine's table falls back to the reference)")
    rng = np.random.default_rng(n_keys + hd + group)
    q = rng.standard_normal((group, hd)).astype(np.float32)
    keys = (rng.standard_normal((n_keys, stride)) * 2).astype(np.float32)
    values = rng.standard_normal((n_keys, stride)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    stored_k = _C.kv_round_trip(np.ascontiguousarray(keys[:, :hd]), kv_dtype)
    stored_v = _C.kv_round_trip(np.ascontiguousarray(values[:, :hd]), kv_dtype)
    out = _C.attend_head(q, keys, values, scale, path, kv_dtype)
    for g in range(group):
        np.testing.assert_allclose(out[g], numpy_attention(q[g], stored_k, stored_v, scale), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[g], _C.attend_head(q[g], keys, values, scale, path, kv_dtype))
    ref = _C.attend_head(q, keys, values, scale, "ref", kv_dtype)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16", "int8"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_keys", [1, 129, 700])
def test_attention_decode_kv_dtypes(kv_dtype, path, n_keys):
    """The engine's decode attention over a compact cache (ranges merged over threads): against
    numpy on the stored keys, and the same bits on 1 and 2 threads."""
    need_path(path)
    n_heads, n_kv, hd = 9, 3, 64
    rng = np.random.default_rng(n_keys)
    q = rng.standard_normal((n_heads, hd)).astype(np.float32)
    keys = (rng.standard_normal((n_keys, n_kv * hd)) * 2).astype(np.float32)
    values = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    keys[0, :hd] *= 1000  # one large row (position 0, kv head 0)
    stored = [_C.kv_round_trip(a.reshape(-1, hd), kv_dtype).reshape(a.shape) for a in (keys, values)]
    out = _C.attention_decode(q, keys, values, n_kv, path, threads=2, kv_dtype=kv_dtype)
    np.testing.assert_allclose(out, numpy_gqa(q, *stored, n_kv), rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(out, _C.attention_decode(q, keys, values, n_kv, path, threads=1, kv_dtype=kv_dtype))
    # int8 scales are per (position, kv head): the large row does not coarsen the others
    if kv_dtype == "int8":
        rows, stored_rows = keys.reshape(-1, hd), stored[0].reshape(-1, hd)
        err = np.abs(stored_rows - rows).max(axis=1)
        assert (err <= np.abs(rows).max(axis=1) / 254 * 1.0001).all() and err[1:].max() < 0.05


def test_kernel_hooks_reject_bad_kv_dtype():
    kv = np.zeros((3, 64), np.float32)
    with pytest.raises(ValueError, match="attend_head: unknown kv_dtype 'q4'"):
        _C.attend_head(np.zeros(64, np.float32), kv, kv, 1.0, "ref", "q4")
    with pytest.raises(ValueError, match="kv_round_trip: unknown kv_dtype 'F16'"):
        _C.kv_round_trip(kv, "F16")


@pytest.mark.parametrize("path", PATHS)
def test_f16_to_f32_row_is_exact_on_every_path(path):
    """Prefill's conversion of an f16 cache into its fp32 scratch: every one of the 65536 bit
    patterns (an odd count of them, so the scalar tail runs too) as numpy converts it."""
    need_path(path)
    bits = np.arange(65536 + 3, dtype=np.uint32).astype(np.uint16)
    got = _C.kernel_f16_to_f32(bits, path)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


# ---- prefill attention (attention_matmul: tiles of query tokens x the heads of a kv head) ----------


def numpy_causal_gqa(q, keys, values, n_kv):
    """q [n, n_heads, hd]; token t at position n_keys - n + t sees keys 0..that position."""
    n, n_heads, hd = q.shape
    pos = keys.shape[0] - n
    return np.stack([numpy_gqa(q[t], keys[:pos + t + 1], values[:pos + t + 1], n_kv) for t in range(n)])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,n_keys,n_heads,n_kv,hd", [
    (1, 1, 9, 3, 64), (5, 5, 9, 3, 64), (70, 70, 9, 3, 64), (23, 100, 9, 3, 64),  # a continued prompt
    (40, 40, 4, 4, 32), (33, 65, 16, 2, 16), (9, 9, 2, 1, 24),  # hd not a multiple of 16: the reference
    (20, 31, 128, 1, 16),  # more heads per kv head than a tile holds rows: the matmul path
])
def test_attention_prefill_equals_numpy(path, n, n_keys, n_heads, n_kv, hd):
    need_path(path)
    rng = np.random.default_rng(n * 100 + n_keys)
    q = rng.standard_normal((n, n_heads, hd)).astype(np.float32)
    keys = (rng.standard_normal((n_keys, n_kv * hd)) * 2).astype(np.float32)
    values = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    out = _C.attention_prefill(q, keys, values, n_kv, path)
    np.testing.assert_allclose(out, numpy_causal_gqa(q, keys, values, n_kv), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("path", PATHS)
def test_attention_prefill_same_bits_for_any_chunking_and_thread_count(path):
    """A query row's arithmetic does not depend on the other rows of its tile: the last tokens of
    a prompt give the same bits prefilled alone (a continued chunk), with the whole prompt, or
    on 1 or 3 threads."""
    need_path(path)
    rng = np.random.default_rng(7)
    n_heads, n_kv, hd, n_keys = 9, 3, 64, 150
    q = rng.standard_normal((n_keys, n_heads, hd)).astype(np.float32)
    keys = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    values = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    full = _C.attention_prefill(q, keys, values, n_kv, path, threads=2)
    np.testing.assert_array_equal(_C.attention_prefill(q, keys, values, n_kv, path, threads=1), full)
    np.testing.assert_array_equal(_C.attention_prefill(q, keys, values, n_kv, path, threads=3), full)
    for begin in (149, 130, 64, 33, 1):
        np.testing.assert_array_equal(_C.attention_prefill(q[begin:], keys, values, n_kv, path), full[begin:],
                                      err_msg=f"from token {begin}")


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16", "int8"])
@pytest.mark.parametrize("path", PATHS)
def test_attention_prefill_kv_dtypes(kv_dtype, path):
    need_path(path)
    rng = np.random.default_rng(3)
    n, n_keys, n_heads, n_kv, hd = 37, 80, 9, 3, 64
    q = rng.standard_normal((n, n_heads, hd)).astype(np.float32)
    keys = (rng.standard_normal((n_keys, n_kv * hd)) * 2).astype(np.float32)
    values = rng.standard_normal((n_keys, n_kv * hd)).astype(np.float32)
    stored = [_C.kv_round_trip(a.reshape(-1, hd), kv_dtype).reshape(a.shape) for a in (keys, values)]
    out = _C.attention_prefill(q, keys, values, n_kv, path, kv_dtype=kv_dtype)
    np.testing.assert_allclose(out, numpy_causal_gqa(q, *stored, n_kv), rtol=1e-5, atol=2e-6)


def test_attention_prefill_rejects_bad_shapes():
    q = np.zeros((4, 9, 64), np.float32)
    kv = np.zeros((3, 3 * 64), np.float32)
    with pytest.raises(ValueError, match="n_keys >= n"):
        _C.attention_prefill(q, kv, kv, 3, "ref")
    with pytest.raises(ValueError, match="n_heads a multiple of n_kv_heads"):
        _C.attention_prefill(q, np.zeros((4, 4 * 64), np.float32), np.zeros((4, 4 * 64), np.float32), 4, "ref")
