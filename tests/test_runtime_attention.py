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
