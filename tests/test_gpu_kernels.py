"""The Triton kernels of the GPU engine against their torch references: in Triton's CPU interpreter
here (tests/conftest.py sets TRITON_INTERPRET=1), and compiled on CUDA tensors in the `gpu`-marked twins.

Tolerances: fp32 runs hold the reference to ~1e-5 relative (only the summation order differs). bf16
runs round each stored result to bf16 (8 significant bits, a relative step of 2^-8 to 2^-7), and the
two paths may round an intermediate (qkv, the output) differently, so they are held to 2 bf16 steps of
the value (2^-6 relative) plus 2^-7 of the reference's largest magnitude for values that cancel to ~0.
"""
import math

import pytest
import torch

from shortrt.kernels import _triton, attention, linear, qkv_rope, rmsnorm, sample, swiglu

from test_gpu_kernel_references import attention_case, qkv_case

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def devices():
    return [pytest.param("cpu", id="interpreted"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")])]


@pytest.fixture(params=devices())
def device(request):
    pytest.importorskip("triton", reason="triton is optional; its kernels are tested where it is installed")
    if request.param == "cpu" and not _triton.triton_interpreted():
        pytest.fail("the Triton kernels are not interpreted: TRITON_INTERPRET=1 must be set before triton is "
                    "first imported (tests/conftest.py does it)")
    return torch.device(request.param)


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.float().cpu(), want.float().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
    else:
        torch.testing.assert_close(got, want, rtol=2.0 ** -6, atol=2.0 ** -7 * want.abs().max().item())


def to(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


# ----------------------------------------------------------------------------- rmsnorm, swiglu

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,d", [(3, 37), (2, 576), (1, 5000)])  # 5000: two BLOCK_D tiles of 4096
def test_rmsnorm_kernel(device, dtype, n, d):
    g = torch.Generator().manual_seed(d)
    x, w = to(device, (torch.randn(n, d, generator=g) * 3).to(dtype), torch.randn(d, generator=g).to(dtype))
    for plus_one in (False, True):
        got = rmsnorm.rmsnorm(x, w, 1e-6, plus_one=plus_one, backend="triton")
        assert_close(got, rmsnorm.rmsnorm_torch(x, w, 1e-6, plus_one=plus_one), dtype)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,ff", [(3, 37), (2, 1500)])
def test_swiglu_kernel(device, dtype, n, ff, act):
    g = torch.Generator().manual_seed(ff)
    gu = torch.randn(n, 2 * ff, generator=g) * 3
    gu[0, :4] = torch.tensor([30.0, -30.0, 1e-3, -1e-3])  # the exp's ends and GELU's flat middle
    (gu,) = to(device, gu.to(dtype))
    assert_close(swiglu.swiglu(gu, act=act, backend="triton"), swiglu.swiglu_torch(gu, act=act), dtype)


# ----------------------------------------------------------------------------- int8 linear

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,m,k", [(1, 48, 64), (19, 130, 96), (3, 17, 416)])  # k 416: a partial 128-wide step
def test_linear_int8_kernel(device, dtype, n, m, k):
    g = torch.Generator().manual_seed(n * m + k)
    w = linear.quantize_int8(torch.randn(m, k, generator=g)).to(device)
    (x,) = to(device, torch.randn(n, k, generator=g).to(dtype))
    got = linear.linear(x, w, backend="triton")
    assert_close(got, linear.linear_int8_torch(x, w), dtype)
    got32 = linear.linear_int8(x, w, out_dtype=torch.float32, backend="triton")
    assert got32.dtype == torch.float32
    assert_close(got32, linear.linear_int8_torch(x, w, out_dtype=torch.float32), torch.float32)


# ----------------------------------------------------------------------------- qkv + rope + cache write

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("nq,nkv,hd", [(4, 2, 16), (3, 1, 32), (2, 2, 64)])
@pytest.mark.parametrize("variant", ["plain+bias", "int8", "int8+qk_norm", "plain+qk_norm+plus_one",
                                     "plain+partial", "int8+qk_norm_whole", "plain+qk_norm_whole+partial",
                                     "plain+qk_norm+plus_one+partial"])
def test_qkv_rope_write_kernel(device, dtype, nq, nkv, hd, variant):
    """Variants: Qwen2 (bias), Qwen3 (per-head q/k norm), Gemma 3 (+ 1 + w), Phi-3 (partial rotary: the
    first rotary_dim dims of each head; 24 of 32 pads the rotated half to 16), OLMo-2 (whole-projection norm)."""
    rotary_dim = {16: 8, 32: 24, 64: 16}[hd] if "partial" in variant else None
    whole = "whole" in variant

    def case():
        c = qkv_case(B=4, d=64, nq=nq, nkv=nkv, hd=hd, R=5, S=12, dtype=dtype, bias="bias" in variant,
                     seed=nq + hd, rotary_dim=rotary_dim)
        c["positions"] = torch.tensor([5, 0, 11, 3])
        c["rows"] = torch.tensor([4, 0, 2, 1])  # rows not in order
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}

    got, want = case(), case()
    if "int8" in variant:
        got["w_qkv"] = want["w_qkv"] = linear.quantize_int8(got["w_qkv"]).to(device)
    kw = {}
    if "qk_norm" in variant:
        g = torch.Generator().manual_seed(3)
        kw = dict(q_norm=torch.randn(nq * hd if whole else hd, generator=g).to(dtype).to(device),
                  k_norm=torch.randn(nkv * hd if whole else hd, generator=g).to(dtype).to(device), norm_eps=1e-6,
                  norm_plus_one="plus_one" in variant, norm_whole=whole)
    q = qkv_rope.qkv_rope_write(**got, **kw, backend="triton")
    q_ref = qkv_rope.qkv_rope_write_torch(**want, **kw)
    assert_close(q, q_ref, dtype)
    assert_close(got["k_cache"], want["k_cache"], dtype)
    assert_close(got["v_cache"], want["v_cache"], dtype)
    untouched = want["k_cache"] == 0  # only the four (row, position) slots were written
    assert (got["k_cache"][untouched] == 0).all() and (got["v_cache"][want["v_cache"] == 0] == 0).all()


# ----------------------------------------------------------------------------- decode attention

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("nq,nkv,hd", [(4, 2, 16), (3, 1, 32), (2, 2, 64), (8, 1, 32)])
@pytest.mark.parametrize("window", [0, 37])
def test_decode_attention_kernel(device, dtype, nq, nkv, hd, window):
    S = 150  # past several key blocks (BLOCK_N is 16..64 here)
    q, kc, vc, rows, _ = attention_case(B=4, nq=nq, nkv=nkv, hd=hd, R=5, S=S, dtype=dtype, seed=nq * hd)
    rows = torch.tensor([4, 0, 2, 0])
    lengths = torch.tensor([150, 1, 77, 64])
    q, kc, vc, rows, lengths = to(device, q, kc, vc, rows, lengths)
    scale = 1 / math.sqrt(hd)
    want = attention.decode_attention_torch(q, kc, vc, rows, lengths, scale, window=window)
    for n_splits in (None, 1, 3):
        got = attention.decode_attention_triton(q, kc, vc, rows, lengths, scale, window=window, n_splits=n_splits)
        assert_close(got, want, dtype)
    assert_close(attention.decode_attention(q, kc, vc, rows, lengths, scale, window=window, backend="triton"),
                 want, dtype)


def test_decode_attention_launcher_limits_the_temporaries():
    pytest.importorskip("triton")
    for nq, nkv, hd in ((32, 8, 128), (28, 4, 128), (9, 3, 64), (16, 16, 256)):
        cfg = attention.launch_config(1, nq, nkv, 4096, hd)
        assert cfg["G_PAD"] * cfg["BLOCK_N"] * cfg["HD_PAD"] <= 4096 * cfg["num_warps"] // 4
        assert 1 <= cfg["n_splits"] <= 64


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("V", [300, 5000])  # 5000: three BLOCK_V tiles
def test_sample_kernel_gives_the_reference_tokens(device, V):
    g = torch.Generator().manual_seed(V)
    B = 12
    logits = torch.randn(B, V, generator=g) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 5e-5, 0.9] * 2)
    top_k = torch.tensor([0, 0, 5, 1, 40, 0, 7, 0, 0, 3, 0, V + 5])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.8, 1.0, 0.3, 1.0, 0.99, 1.0, 0.95, 0.6])
    uniform = torch.rand(B, generator=g)
    args = to(device, logits, temperature, top_k, top_p, uniform)
    got = sample.sample(*args, backend="triton")
    assert got.dtype == torch.int64
    assert got.cpu().tolist() == sample.sample_torch(logits, temperature, top_k, top_p, uniform).tolist()


def test_sample_kernel_greedy_ties_and_uniform_edges(device):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    args = to(device, logits, torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.int64), torch.ones(3),
              torch.tensor([0.0, 0.0, 0.999]))
    assert sample.sample(*args, backend="triton").cpu().tolist() == [1, 0, 3]


def test_auto_backend_is_triton_when_interpreted():
    pytest.importorskip("triton")
    assert _triton.choose_backend("rmsnorm", "auto", torch.device("cpu")) == \
        ("triton" if _triton.triton_interpreted() else "torch")


def test_triton_backend_without_the_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(_triton, "triton_interpreted", lambda: False)
    with pytest.raises(_triton.KernelUnavailableError, match="TRITON_INTERPRET=1"):
        rmsnorm.rmsnorm(torch.zeros(2, 4), torch.ones(4), 1e-5, backend="triton")
    assert _triton.choose_backend("rmsnorm", "auto", torch.device("cpu")) == "torch"
