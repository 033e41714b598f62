"""The fused cosine kernel: Triton (in its CPU interpreter) against the torch reference, and the
reference against plain fp64 math, on odd sizes, three dtypes and the edge cases."""
import math

import pytest
import torch

from shortrt.kernels import _triton, cosine

SIZES = [(37, 100), (257, 576), (1, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_pair(tokens, hidden, dtype, seed=0):
    """x, y whose per-token cosines spread over (-1, 1): y mixes x and noise in varying proportions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * 3.0
    mix = torch.linspace(-1.0, 1.0, tokens)[:, None] if tokens > 1 else torch.tensor([[0.5]])
    y = mix * x + (1 - mix.abs()) * 3.0 * torch.randn(tokens, hidden, generator=g)
    return x.to(dtype), y.to(dtype)


def fp64_stats(x, y):
    x, y = x.double(), y.double()
    norms = x.norm(dim=1) * y.norm(dim=1)
    cos = torch.where(norms > 0, (x * y).sum(1) / norms.clamp_min(1e-300), 0.0).clamp(-1, 1)
    return cos, cos.sum().item(), (torch.arccos(cos) / math.pi).sum().item()


@pytest.fixture(scope="module")
def triton_cosine():
    pytest.importorskip("triton", reason="triton is optional; its kernel is tested where it is installed")
    if not cosine.triton_interpreted():
        pytest.fail("the Triton kernel is not interpreted: TRITON_INTERPRET=1 must be set before triton is "
                    "first imported (tests/conftest.py does it)")
    return cosine


@pytest.mark.parametrize("tokens,hidden", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_triton_kernel_matches_torch_reference(triton_cosine, tokens, hidden, dtype):
    x, y = random_pair(tokens, hidden, dtype, seed=tokens + hidden)
    cos_t, sums_t = triton_cosine.cosine_stats(x, y, backend="triton")
    cos_r, sums_r = triton_cosine.cosine_stats(x, y, backend="torch")
    assert cos_t.dtype == torch.float32 and cos_t.shape == (tokens,)
    assert sums_t.dtype == torch.float64 and sums_t.shape == (2,)
    assert torch.allclose(cos_t, cos_r, atol=2e-6, rtol=0)
    # Sums: fp32 rounding of each cos plus the arccos polynomial (1e-7), summed over tokens.
    assert abs(sums_t[0].item() - sums_r[0].item()) <= 2e-6 * tokens
    assert abs(sums_t[1].item() - sums_r[1].item()) <= 2e-6 * tokens


@pytest.mark.parametrize("tokens,hidden", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_torch_reference_matches_fp64_math(tokens, hidden, dtype):
    x, y = random_pair(tokens, hidden, dtype, seed=1)
    cos, sums = cosine.cosine_stats(x, y, backend="torch")
    cos64, cos_sum, angular_sum = fp64_stats(x, y)
    assert torch.allclose(cos.double(), cos64, atol=1e-6, rtol=0)
    assert sums[0].item() == pytest.approx(cos_sum, abs=1e-6 * tokens)
    assert sums[1].item() == pytest.approx(angular_sum, abs=1e-5 * tokens)


def test_triton_kernel_reads_strided_rows(triton_cosine):
    wide_x, wide_y = random_pair(70, 300, torch.float32, seed=3)
    x, y = wide_x[:, :130], wide_y[:, 7:137]  # row stride 300, not contiguous
    cos_t, sums_t = triton_cosine.cosine_stats(x, y, backend="triton")
    cos_r, sums_r = triton_cosine.cosine_stats(x.contiguous(), y.contiguous(), backend="torch")
    assert torch.allclose(cos_t, cos_r, atol=2e-6, rtol=0)
    assert torch.allclose(sums_t, sums_r, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_identical_opposite_and_zero_rows(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_cosine")
    x, _ = random_pair(65, 96, torch.float32, seed=4)  # 65 tokens: two programs, the second with one row
    cos, sums = cosine.cosine_stats(x, x.clone(), backend=backend)
    assert torch.equal(cos, torch.ones(65))
    assert sums[0].item() == 65.0 and sums[1].item() == pytest.approx(0.0, abs=1e-9)

    cos, sums = cosine.cosine_stats(x, -x, backend=backend)
    assert torch.equal(cos, -torch.ones(65))
    assert sums[0].item() == -65.0 and sums[1].item() == pytest.approx(65.0, abs=1e-5)

    y = x.clone()
    y[10] = 0.0
    cos, sums = cosine.cosine_stats(x, y, backend=backend)
    assert cos[10].item() == 0.0 and torch.all(cos[torch.arange(65) != 10] == 1.0)
    assert sums[0].item() == 64.0 and sums[1].item() == pytest.approx(0.5, abs=1e-6)  # arccos(0)/pi


def test_bf16_inputs_are_not_mistaken_for_their_bit_patterns(triton_cosine):
    # A bf16 tile used without a cast in the interpreter computes on raw 16-bit integers.
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y = torch.tensor([[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    cos, sums = triton_cosine.cosine_stats(x, y, backend="triton")
    assert cos.tolist() == pytest.approx([1.0, 0.0], abs=1e-7)
    assert sums[1].item() == pytest.approx(0.5, abs=1e-6)


def test_arccos_polynomial_is_accurate(triton_cosine):
    c = torch.linspace(-1.0, 1.0, 20001)
    approx = triton_cosine.arccos_over_pi_triton(c).double()
    exact = torch.arccos(c.double()) / math.pi
    assert (approx - exact).abs().max().item() < 1e-6
    assert approx[0].item() == pytest.approx(1.0, abs=1e-7) and approx[-1].item() == 0.0


def test_auto_backend_on_cpu_is_the_torch_reference():
    x, y = random_pair(33, 50, torch.float32)
    cos_a, sums_a = cosine.cosine_stats(x, y)
    cos_r, sums_r = cosine.cosine_stats_torch(x, y)
    assert torch.equal(cos_a, cos_r) and torch.equal(sums_a, sums_r)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(_triton, "triton_interpreted", lambda: False)
    x, y = random_pair(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cosine.cosine_stats(x, y, backend="triton")


@pytest.mark.parametrize("x,y,error,match", [
    (torch.zeros(3, 4), torch.zeros(3, 5), ValueError, "same shape"),
    (torch.zeros(4), torch.zeros(4), ValueError, "2-D"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), ValueError, "2-D"),
    (torch.zeros(0, 4), torch.zeros(0, 4), ValueError, "empty"),
    (torch.zeros(3, 0), torch.zeros(3, 0), ValueError, "empty"),
    (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32), TypeError, "float32, bfloat16"),
    (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), TypeError, "float64"),
    ([[1.0]], torch.zeros(1, 1), TypeError, "torch tensors"),
])
def test_bad_inputs_are_named(x, y, error, match):
    with pytest.raises(error, match=match):
        cosine.cosine_stats(x, y)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown cosine backend 'cuda'"):
        cosine.cosine_stats(torch.ones(1, 2), torch.ones(1, 2), backend="cuda")
