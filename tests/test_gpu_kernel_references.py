"""The torch references of the GPU engine's kernels (shortrt/kernels/) against independent math:
plain fp64 loops, transformers' RoPE, and the C++ runtime's own int8 packing."""
import math

import numpy as np
import pytest
import torch

from shortrt.kernels import attention, linear, qkv_rope, rmsnorm, sample, swiglu
from shortrt.kernels.linear import Int8Weight, quantize_int8


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- rmsnorm, swiglu

@pytest.mark.parametrize("plus_one", [False, True])
def test_rmsnorm_reference_is_the_formula(plus_one):
    x = torch.randn(5, 37, generator=gen(0), dtype=torch.float64)
    w = torch.randn(37, generator=gen(1), dtype=torch.float64)
    want = x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + 1e-5) * (1 + w if plus_one else w)
    got = rmsnorm.rmsnorm_torch(x.float(), w.float(), 1e-5, plus_one=plus_one)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    got16 = rmsnorm.rmsnorm_torch(x.bfloat16(), w.bfloat16(), 1e-5, plus_one=plus_one)
    assert got16.dtype == torch.bfloat16


def test_swiglu_reference_is_the_formula():
    gu = torch.randn(3, 2 * 19, generator=gen(2), dtype=torch.float64)
    g, u = gu[:, :19], gu[:, 19:]
    want = g / (1 + torch.exp(-g)) * u
    assert torch.allclose(swiglu.swiglu_torch(gu.float()).double(), want, rtol=1e-5, atol=1e-6)


def test_geglu_reference_is_gelus_tanh_formula():
    """Gemma 3's GeGLU: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * u, from |g| near 0 to 12."""
    gu = torch.randn(4, 2 * 23, generator=gen(12), dtype=torch.float64) * 4
    gu[0, :5] = torch.tensor([0.0, 1e-4, -1e-4, 12.0, -12.0], dtype=torch.float64)
    g, u = gu[:, :23], gu[:, 23:]
    want = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    got = swiglu.swiglu_torch(gu.float(), act="gelu_tanh").double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, swiglu.swiglu_torch(gu.float()).double(), atol=1e-2)  # not silu
    with pytest.raises(ValueError, match="unknown act 'gelu'"):
        swiglu.swiglu_torch(gu.float(), act="gelu")


# ----------------------------------------------------------------------------- int8 packing

def int8_weights():
    w = torch.randn(6, 96, generator=gen(3)) * 0.05
    w[1, 32:64] = 0.0                                          # an all-zero block: scale 0, q 0
    w[2, :32] = torch.arange(32, dtype=torch.float32) - 15.5   # halves after scaling: round half to even
    w[3, :32] = torch.linspace(-1.0, 1.0, 32)
    w[4, 64:] = 1e-30                                          # a tiny but non-zero block
    w[5, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 126.5])  # scale 1: exact halves
    return w


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_int8_is_bit_identical_to_the_cpp_runtime(source_dtype):
    from shortrt import _C

    w = int8_weights().to(source_dtype)
    packed = quantize_int8(w)
    flat = w.float().reshape(-1).numpy()
    for path in ("ref", "auto"):
        scales, q = _C.quantize_q8(flat, path)
        assert np.array_equal(packed.scale.reshape(-1).numpy().view(np.uint32), scales.view(np.uint32)), path
        assert np.array_equal(packed.q.reshape(-1, 32).numpy(), q), path
    # and the dequantized weight is the runtime's, bit for bit
    deq = _C.dequantize_q8(scales, q)
    assert np.array_equal(packed.dequantize().reshape(-1).numpy().view(np.uint32), deq.view(np.uint32))


def test_quantize_int8_is_within_half_a_step():
    w = int8_weights()
    packed = quantize_int8(w)
    step = packed.scale.repeat_interleave(32, dim=1)
    assert ((packed.dequantize() - w).abs() <= step * 0.5 + 1e-12).all()
    assert packed.q.abs().max().item() == 127
    assert packed.q[5, :8].tolist() == [127, 2, 4, -2, -4, 0, 0, 126]  # half to even


@pytest.mark.parametrize("bad,error,match", [
    (torch.zeros(4, 33), ValueError, "multiple of 32"),
    (torch.zeros(64), TypeError, r"\[m, k\]"),
    (torch.zeros(2, 32, dtype=torch.int32), TypeError, "floating"),
    (torch.full((2, 32), float("nan")), ValueError, "NaN"),
])
def test_quantize_int8_rejects_bad_weights(bad, error, match):
    with pytest.raises(error, match=match):
        quantize_int8(bad)


def test_int8_weight_checks_its_parts():
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8Weight(torch.zeros(2, 40, dtype=torch.int8), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="scale must be fp32"):
        Int8Weight(torch.zeros(2, 64, dtype=torch.int8), torch.zeros(2, 3))


def test_linear_int8_reference_is_x_times_the_dequantized_weight():
    w = quantize_int8(torch.randn(40, 64, generator=gen(4)))
    x = torch.randn(3, 64, generator=gen(5))
    want = x.double() @ w.dequantize().double().T
    assert torch.allclose(linear.linear_int8_torch(x, w).double(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(linear.linear(x, w, backend="torch").double(), want, rtol=1e-5, atol=1e-5)
    plain = torch.randn(40, 64, generator=gen(6))
    assert torch.allclose(linear.linear(x, plain), x @ plain.T)
    with pytest.raises(ValueError, match=r"x must be \[n, 64\]"):
        linear.linear_int8_torch(torch.zeros(3, 32), w)
    with pytest.raises(TypeError, match="must match the activations"):
        linear.linear(x, plain.bfloat16())


# ----------------------------------------------------------------------------- qkv + rope + cache write

def rope_tables(S, hd, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def qkv_case(B=3, d=40, nq=4, nkv=2, hd=16, R=4, S=12, seed=7, dtype=torch.float32, bias=True, rotary_dim=None):
    g = gen(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    w = (torch.randn((nq + 2 * nkv) * hd, d, generator=g) * 0.2).to(dtype)
    b = (torch.randn((nq + 2 * nkv) * hd, generator=g) * 0.1).to(dtype) if bias else None
    cos, sin = rope_tables(S, rotary_dim or hd)
    positions = torch.tensor([5, 0, 11, 3, 7, 2][:B])
    rows = torch.tensor([2, 0, 3, 1, 0, 2][:B])
    kc = torch.zeros(R, nkv, S, hd, dtype=dtype)
    vc = torch.zeros(R, nkv, S, hd, dtype=dtype)
    return dict(x=x, w_qkv=w, b_qkv=b, cos=cos, sin=sin, positions=positions, k_cache=kc, v_cache=vc,
                rows=rows, n_heads=nq, n_kv_heads=nkv, head_dim=hd, rotary_dim=rotary_dim)


def test_qkv_rope_write_reference_matches_transformers_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    case = qkv_case()
    B, nq, nkv, hd = 3, 4, 2, 16
    q = qkv_rope.qkv_rope_write_torch(**case)
    qkv = case["x"].double() @ case["w_qkv"].double().T + case["b_qkv"].double()
    q0 = qkv[:, : nq * hd].reshape(B, nq, 1, hd)
    k0 = qkv[:, nq * hd: (nq + nkv) * hd].reshape(B, nkv, 1, hd)
    v0 = qkv[:, (nq + nkv) * hd:].reshape(B, nkv, hd)
    c, s = case["cos"].double(), case["sin"].double()
    cos_full = torch.cat([c, c], dim=1)[case["positions"]][:, None, :]  # [B, seq 1, hd]
    sin_full = torch.cat([s, s], dim=1)[case["positions"]][:, None, :]
    q_want, k_want = apply_rotary_pos_emb(q0, k0, cos_full, sin_full)
    assert q.shape == (B, nq, hd) and q.dtype == torch.float32
    assert torch.allclose(q.double(), q_want[:, :, 0], rtol=1e-5, atol=1e-5)
    written = torch.zeros(case["k_cache"].shape, dtype=torch.bool)
    for b in range(B):
        r, p = case["rows"][b].item(), case["positions"][b].item()
        assert torch.allclose(case["k_cache"][r, :, p].double(), k_want[b, :, 0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(case["v_cache"][r, :, p].double(), v0[b], rtol=1e-5, atol=1e-5)
        written[r, :, p] = True
    assert (case["k_cache"][~written] == 0).all() and (case["v_cache"][~written] == 0).all()


def test_qkv_rope_write_reference_norms_each_head_before_rope():
    case = qkv_case(bias=False, seed=8)
    hd = case["head_dim"]
    qn = torch.randn(hd, generator=gen(9))
    kn = torch.randn(hd, generator=gen(10))
    q = qkv_rope.qkv_rope_write_torch(**case, q_norm=qn, k_norm=kn, norm_eps=1e-6)
    # With the norm first, |roped q head| = |normed head| (rope is a rotation): check against the norm alone.
    qkv = case["x"].double() @ case["w_qkv"].double().T
    q0 = qkv[:, : 4 * hd].reshape(3, 4, hd)
    normed = q0 / torch.sqrt((q0 * q0).mean(dim=-1, keepdim=True) + 1e-6) * qn.double()
    assert torch.allclose(q.double().norm(dim=-1), normed.norm(dim=-1), rtol=1e-5)
    # position 0 (sequence 1) is not rotated at all
    assert torch.allclose(q[1].double(), normed[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [8, 12])
def test_qkv_rope_write_reference_partial_rotary_matches_transformers_phi3(rotary_dim):
    """Phi-3's partial rotary: transformers' Phi-3 RoPE turns the first rotary_dim dims of each head."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    case = qkv_case(rotary_dim=rotary_dim)
    B, nq, nkv, hd = 3, 4, 2, 16
    q = qkv_rope.qkv_rope_write_torch(**case)
    qkv = case["x"].double() @ case["w_qkv"].double().T + case["b_qkv"].double()
    q0 = qkv[:, : nq * hd].reshape(B, nq, 1, hd)
    k0 = qkv[:, nq * hd: (nq + nkv) * hd].reshape(B, nkv, 1, hd)
    c, s = case["cos"].double(), case["sin"].double()
    assert c.shape == (12, rotary_dim // 2)
    cos_full = torch.cat([c, c], dim=1)[case["positions"]][:, None, :]
    sin_full = torch.cat([s, s], dim=1)[case["positions"]][:, None, :]
    q_want, k_want = apply_rotary_pos_emb(q0, k0, cos_full, sin_full)
    assert torch.allclose(q.double(), q_want[:, :, 0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(q[..., rotary_dim:].double(), q0[:, :, 0, rotary_dim:], rtol=1e-5, atol=1e-6)  # untouched
    for b in range(B):
        r, p = case["rows"][b].item(), case["positions"][b].item()
        assert torch.allclose(case["k_cache"][r, :, p].double(), k_want[b, :, 0], rtol=1e-5, atol=1e-5)
    wrong = {**qkv_case(rotary_dim=8), "rotary_dim": 16}  # tables for 8 rotated dims, 16 asked for
    with pytest.raises(ValueError, match=r"cos must be \[>= S = 12, rotary_dim / 2 = 8\], got \[12, 4\]"):
        qkv_rope.qkv_rope_write_torch(**wrong)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        qkv_rope.qkv_rope_write_torch(**{**qkv_case(), "rotary_dim": 7})


def test_qkv_rope_write_reference_whole_projection_norm():
    """OLMo-2: q_norm [nq * hd] and k_norm [nkv * hd] norm the whole projections before RoPE (one RMS over
    all heads), not each head."""
    case = qkv_case(bias=False, seed=13)
    nq, nkv, hd = 4, 2, 16
    qn = 1 + 0.3 * torch.randn(nq * hd, generator=gen(14))
    kn = 1 + 0.3 * torch.randn(nkv * hd, generator=gen(15))
    q = qkv_rope.qkv_rope_write_torch(**case, q_norm=qn, k_norm=kn, norm_eps=1e-6, norm_whole=True)
    qkv = case["x"].double() @ case["w_qkv"].double().T
    q0, k0 = qkv[:, : nq * hd], qkv[:, nq * hd: (nq + nkv) * hd]
    q_normed = (q0 / torch.sqrt((q0 * q0).mean(dim=1, keepdim=True) + 1e-6) * qn.double()).reshape(3, nq, hd)
    k_normed = (k0 / torch.sqrt((k0 * k0).mean(dim=1, keepdim=True) + 1e-6) * kn.double()).reshape(3, nkv, hd)
    assert torch.allclose(q[1].double(), q_normed[1], rtol=1e-5, atol=1e-6)  # position 0: no rotation
    assert torch.allclose(q.double().norm(dim=-1), q_normed.norm(dim=-1), rtol=1e-5)  # RoPE keeps head norms
    r = case["rows"][1].item()
    assert torch.allclose(case["k_cache"][r, :, 0].double(), k_normed[1], rtol=1e-5, atol=1e-6)
    per_head = qkv_rope.qkv_rope_write_torch(**qkv_case(bias=False, seed=13), q_norm=qn[:hd], k_norm=kn[:hd],
                                             norm_eps=1e-6)
    assert not torch.allclose(per_head, q, atol=1e-3)
    with pytest.raises(ValueError, match=r"q_norm must have shape \[64\]"):
        qkv_rope.qkv_rope_write_torch(**qkv_case(bias=False), q_norm=qn[:hd], k_norm=kn, norm_whole=True)


def test_qkv_rope_write_int8_weight_is_the_dequantized_weight():
    case = qkv_case(bias=False, d=64, seed=11)
    case8 = {**qkv_case(bias=False, d=64, seed=11), "w_qkv": quantize_int8(case["w_qkv"])}
    case_deq = {**qkv_case(bias=False, d=64, seed=11), "w_qkv": case8["w_qkv"].dequantize()}
    q8 = qkv_rope.qkv_rope_write_torch(**case8)
    qd = qkv_rope.qkv_rope_write_torch(**case_deq)
    assert torch.equal(q8, qd) and torch.equal(case8["k_cache"], case_deq["k_cache"])


@pytest.mark.parametrize("change,error,match", [
    (dict(head_dim=15), ValueError, "head_dim must be even"),
    (dict(n_heads=3), ValueError, "multiple of n_kv_heads"),
    (dict(positions=torch.tensor([5, 0, 12])), ValueError, r"positions must be in \[0, S = 12\)"),
    (dict(rows=torch.tensor([0, 4, 1])), ValueError, r"rows must be in \[0, R = 4\)"),
    (dict(positions=torch.tensor([5, 0, 1], dtype=torch.int32)), TypeError, "positions must be int64"),
    (dict(w_qkv=torch.zeros(10, 40)), ValueError, "w_qkv must be"),
    (dict(v_cache=torch.zeros(4, 2, 12, 16, dtype=torch.bfloat16)), ValueError, "must match k_cache"),
])
def test_qkv_rope_write_bad_input_is_named(change, error, match):
    case = {**qkv_case(), **change}
    with pytest.raises(error, match=match):
        qkv_rope.qkv_rope_write(**case, backend="torch")


# ----------------------------------------------------------------------------- decode attention

def naive_attention(q, kc, vc, rows, lengths, scale, window):
    """One sequence and one head at a time, fp64."""
    B, nq, hd = q.shape
    nkv = kc.shape[1]
    out = torch.zeros(B, nq, hd, dtype=torch.float64)
    for b in range(B):
        hi = lengths[b].item()
        lo = max(0, hi - window) if window else 0
        for h in range(nq):
            kv = h // (nq // nkv)
            k = kc[rows[b], kv, lo:hi].double()
            v = vc[rows[b], kv, lo:hi].double()
            s = (k @ q[b, h].double()) * scale
            p = torch.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v
    return out


def attention_case(B=3, nq=4, nkv=2, hd=16, R=4, S=40, seed=12, dtype=torch.float32):
    g = gen(seed)
    q = torch.randn(B, nq, hd, generator=g).to(dtype)
    kc = torch.randn(R, nkv, S, hd, generator=g).to(dtype)
    vc = torch.randn(R, nkv, S, hd, generator=g).to(dtype)
    rows = torch.tensor([3, 0, 2, 1, 0][:B])
    lengths = torch.tensor([S, 1, 23, 17, 9][:B])
    return q, kc, vc, rows, lengths


@pytest.mark.parametrize("nq,nkv", [(4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("window", [0, 7])
def test_decode_attention_reference_matches_naive_softmax(nq, nkv, window):
    q, kc, vc, rows, lengths = attention_case(nq=nq, nkv=nkv)
    scale = 1 / math.sqrt(16)
    got = attention.decode_attention_torch(q, kc, vc, rows, lengths, scale, window=window)
    want = naive_attention(q, kc, vc, rows, lengths, scale, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(lengths=torch.tensor([41, 1, 2])), ValueError, r"lengths must be in \[1, S = 40\]"),
    (dict(lengths=torch.tensor([0, 1, 2])), ValueError, "lengths must be in"),
    (dict(rows=torch.tensor([0, 1, 4])), ValueError, "rows must be in"),
    (dict(q=torch.zeros(3, 3, 16)), ValueError, r"nq \(3\) must be a multiple"),
    (dict(q=torch.zeros(3, 4, 8)), ValueError, "hd = 8"),
    (dict(window=-1), ValueError, "window must be"),
    (dict(q=torch.zeros(3, 4, 16, dtype=torch.float16)), TypeError, "q must be float32, bfloat16"),
])
def test_decode_attention_bad_input_is_named(change, error, match):
    q, kc, vc, rows, lengths = attention_case()
    args = dict(q=q, k_cache=kc, v_cache=vc, rows=rows, lengths=lengths, scale=0.25, window=0)
    args.update(change)
    with pytest.raises(error, match=match):
        attention.decode_attention(**args, backend="torch")


# ----------------------------------------------------------------------------- sampling

def naive_sample(logits, T, k, p, u):
    """One row in fp64 with Python sorting: the rule in shortrt/kernels/sample.py's docstring."""
    V = len(logits)
    if T < sample.MIN_TEMPERATURE:
        return int(max(range(V), key=lambda i: (logits[i], -i)))
    e = [math.exp((x - max(logits)) / T) for x in logits]
    desc = sorted(e, reverse=True)
    kth = desc[(k if 0 < k < V else V) - 1]
    keep = [x >= kth for x in e]
    if p < 1.0:
        kept = sorted((x for x, kp in zip(e, keep) if kp), reverse=True)
        total, run = sum(kept), 0.0
        for t in kept:
            run += t
            if run >= p * total:
                break
        keep = [kp and x >= t for x, kp in zip(e, keep)]
    mass = sum(x for x, kp in zip(e, keep) if kp)
    run = 0.0
    for i in range(V):
        if keep[i]:
            run += e[i]
            if run > u * mass:
                return i
    return max(i for i in range(V) if keep[i])


def test_sample_reference_matches_the_rule():
    g = gen(13)
    B, V = 24, 50
    logits = torch.randn(B, V, generator=g) * 2
    temperature = torch.tensor([0.0, 1e-5, 0.7, 1.0, 1.5, 0.9] * 4)
    top_k = torch.tensor([0, 0, 0, 5, 1, 50, 3, 0] * 3)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.3, 0.95] * 4)
    uniform = torch.rand(B, generator=g)
    got = sample.sample_torch(logits, temperature, top_k, top_p, uniform)
    assert got.dtype == torch.int64
    want = [naive_sample(logits[b].double().tolist(), temperature[b].item(), top_k[b].item(), top_p[b].item(),
                         uniform[b].item()) for b in range(B)]
    assert got.tolist() == want


def test_sample_greedy_takes_the_lowest_index_on_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    zeros = torch.zeros(2)
    got = sample.sample_torch(logits, zeros, torch.zeros(2, dtype=torch.int64), torch.ones(2), zeros)
    assert got.tolist() == [1, 0]


def test_sample_uniform_walks_the_kept_tokens_in_index_order():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    one = torch.ones(1)
    for u, token in ((0.0, 0), (0.05, 0), (0.11, 1), (0.49, 1), (0.51, 2), (0.71, 3), (0.999, 3)):
        got = sample.sample_torch(logits, one, torch.zeros(1, dtype=torch.int64), one, torch.tensor([u]))
        assert got.item() == token, u
    # top_k 2 keeps tokens 1 and 3 (0.4 and 0.3): u * 0.7 below 0.4 is token 1, above it token 3
    for u, token in ((0.5, 1), (0.6, 3)):
        got = sample.sample_torch(logits, one, torch.tensor([2]), one, torch.tensor([u]))
        assert got.item() == token, u
    # top_p 0.6: 0.4 + 0.3 reaches it; 0.4 alone does not
    got = sample.sample_torch(logits, one, torch.zeros(1, dtype=torch.int64), torch.tensor([0.6]), torch.tensor([0.99]))
    assert got.item() == 3


@pytest.mark.parametrize("change,error,match", [
    (dict(temperature=torch.tensor([-1.0])), ValueError, "temperature must be finite"),
    (dict(top_k=torch.tensor([-2])), ValueError, "top_k must be >= 0"),
    (dict(top_p=torch.tensor([0.0])), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(uniform=torch.tensor([1.0])), ValueError, r"uniform must be in \[0, 1\)"),
    (dict(logits=torch.zeros(1, 4, dtype=torch.bfloat16)), TypeError, "logits must be float32"),
    (dict(top_k=torch.tensor([1, 2])), ValueError, r"top_k must have shape \[1\]"),
])
def test_sample_bad_input_is_named(change, error, match):
    args = dict(logits=torch.zeros(1, 4), temperature=torch.ones(1), top_k=torch.zeros(1, dtype=torch.int64),
                top_p=torch.ones(1), uniform=torch.zeros(1))
    args.update(change)
    with pytest.raises(error, match=match):
        sample.sample(**args, backend="torch")


@pytest.mark.parametrize("module,fn", [(rmsnorm, "rmsnorm"), (swiglu, "swiglu")])
def test_unknown_backend_is_named(module, fn):
    with pytest.raises(ValueError, match="unknown .* backend 'cuda'"):
        getattr(module, fn)(torch.zeros(2, 4), torch.ones(4), 1e-5, backend="cuda") if fn == "rmsnorm" \
            else getattr(module, fn)(torch.zeros(2, 4), backend="cuda")
