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
