"""The amx kernel path: int8 matmuls of several tokens on AMX tiles (csrc/kernels_amx.h).

No machine this project tests on has AMX, so the algorithm (packing of A and B, the
16-row tiles and their zero-padded edges, the scales, the float accumulation and its
order) is tested through "amx-emulated": the same code on a plain-C++ emulation of the
tile instructions. It must give the avx512 int8 kernel's bits — the design promise that
lets amx replace avx512 (forced with SHORTRT_KERNELS=amx; auto keeps avx512 until amx's
speed has been measured) without changing a result. The real tiles run only where the CPU,
its OS and Linux allow them; elsewhere those tests skip and say what is missing.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shortrt import _C

HAS_AVX512 = "avx512" in _C.kernel_paths()
HAS_AMX = "amx" in _C.kernel_paths()
AMX_MISSING = _C.kernel_amx_unavailable()
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the emulated amx algorithm's float part needs the avx512 path")
needs_amx = pytest.mark.skipif(not HAS_AMX, reason=f"real AMX path skipped: {AMX_MISSING}")

# (rows, blocks): rows below, at and past one 16-row tile (and not multiples of 16),
# block counts leaving 0..3 blocks for the last quad, the default model's 18 and 48.
SHAPES = [(1, 1), (3, 2), (16, 3), (17, 7), (15, 12), (33, 13), (48, 18), (5, 19), (40, 48), (9, 65)]
TOKENS = [1, 2, 7, 15, 16, 17, 33, 64]


@pytest.fixture
def rng():
    return np.random.default_rng(1717)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def problem(rng, rows, blocks, n_tokens):
    w = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    x = (rng.standard_normal((n_tokens, 32 * blocks)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    return w, x


@needs_avx512
@pytest.mark.parametrize("rows, blocks", SHAPES)
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_emulated_tiles_give_the_avx512_bits(rng, rows, blocks, n_tokens):
    w, x = problem(rng, rows, blocks, n_tokens)
    emulated = _C.kernel_matmul(w, x, "q8", "amx-emulated", threads=2)
    np.testing.assert_array_equal(bits(emulated), bits(_C.kernel_matmul(w, x, "q8", "avx512", threads=2)))


@needs_avx512
@pytest.mark.parametrize("rows, blocks", [(17, 7), (48, 18)])
def test_emulated_tiles_are_near_the_reference(rng, rows, blocks):
    w, x = problem(rng, rows, blocks, 19)
    ref = _C.kernel_matmul(w, x, "q8", "ref")  # float64 sums of the same int8 block products
    err = np.abs(_C.kernel_matmul(w, x, "q8", "amx-emulated").astype(np.float64) - ref)
    assert np.all(err <= 1e-5 * np.abs(ref).max() * 4)


@needs_avx512
def test_emulated_tiles_stay_exact_at_the_extremes(rng):
    # Every byte +-127 (the largest int32 tile sums) and exact zeros (a zero block scale).
    w = np.where(rng.random((19, 32 * 9)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = np.where(rng.random((18, 32 * 9)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[1] = 0.0
    w[2, :32] = 0.0
    got = _C.kernel_matmul(w, x, "q8", "amx-emulated")
    np.testing.assert_array_equal(bits(got), bits(_C.kernel_matmul(w, x, "q8", "avx512")))
    assert np.all(got[1] == 0)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)


@needs_avx512
@pytest.mark.parametrize("n_tokens", [5, 48, 61])
def test_emulated_tiles_give_the_same_bits_for_any_block_of_rows_tokens_and_threads(rng, n_tokens):
    w, x = problem(rng, 101, 13, n_tokens)
    full = _C.kernel_matmul(w, x, "q8", "amx-emulated", threads=1)
    for begin, end in [(0, 1), (3, 20), (17, 101), (100, 101)]:
        np.testing.assert_array_equal(_C.kernel_matmul(w[begin:end], x, "q8", "amx-emulated"), full[:, begin:end])
    for t in (0, n_tokens - 1):
        np.testing.assert_array_equal(_C.kernel_matmul(w, x[t:t + 1], "q8", "amx-emulated")[0], full[t])
    np.testing.assert_array_equal(_C.kernel_matmul(w, x, "q8", "amx-emulated", threads=3), full)


def test_emulated_path_is_refused_without_avx512():
    if HAS_AVX512:
        pytest.skip("this CPU has the avx512 path, so amx-emulated runs")
    with pytest.raises(ValueError, match="lacks the avx512 path"):
        _C.kernel_matmul(np.ones((1, 32), np.float32), np.ones((1, 32), np.float32), "q8", "amx-emulated")


@needs_amx
@pytest.mark.parametrize("rows, blocks", SHAPES)
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_real_tiles_give_the_avx512_bits(rng, rows, blocks, n_tokens):
    w, x = problem(rng, rows, blocks, n_tokens)
    np.testing.assert_array_equal(bits(_C.kernel_matmul(w, x, "q8", "amx", threads=2)),
                                  bits(_C.kernel_matmul(w, x, "q8", "avx512", threads=2)))


def test_amx_path_is_refused_cleanly_when_missing():
    if HAS_AMX:
        pytest.skip("this machine runs the real AMX path")
    assert AMX_MISSING  # names what is missing: cpuid, XCR0, Linux permission or the self-check
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
        """)
    env = dict(os.environ, SHORTRT_KERNELS="amx")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"error:ValueError:SHORTRT_KERNELS: kernel path 'amx' requested, but {AMX_MISSING}; " \
                                 "use 'avx512', 'avx2', 'ref' or 'auto'"
    with pytest.raises(ValueError, match="kernel path 'amx' requested"):
        _C.set_kernels("amx")
