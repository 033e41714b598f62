"""The GPU engine (shortrt/gpu_engine.py) held to the C++ runtime on tiny models.

Without a GPU it runs on CPU tensors: backend="torch" (the kernels' references) and backend="triton"
(the Triton kernels in Triton's interpreter; conftest sets TRITON_INTERPRET=1). Tests marked `gpu`
run the same checks on CUDA and are skipped without one (benchmarks/gpu_check.sh runs them there).

Tolerances: fp32 logits within 1e-5 of the C++ runtime's (max abs difference / max |logit|; both
accumulate fp32 in different orders, measured ~6e-7); bf16 within 0.03 and int8 within 0.05 of the
engine's own fp32 (the C++ runtime's bf16 / int8 are 0.008 / 0.035 from fp32 on the same model).
"""
import asyncio

import numpy as np
import pytest
import torch

import shortrt
from runtime_models import IDS_SHORT, make_tiny, rel_err, write_pruned
from shortrt.engine import Engine
from shortrt.errors import DeviceUnavailableError
from shortrt.gpu_engine import GpuEngine

MAX_SEQ = 64
PROMPTS = [[1, 17, 250, 3], [1, 99, 42, 42, 7, 123, 5], [5, 6]]
BACKENDS = ["torch", "triton"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """llama (with a tokenizer), qwen2 (q/k/v bias), qwen3 (q/k norm, head_dim 32) and a llama pruned to
    layers 0, 2, 3 whose middle layer has no attention (2 KV slots of 4 layers)."""
    root = tmp_path_factory.mktemp("gpu-engine")
    out = {"llama": make_tiny(root / "llama", "llama", tokenizer=True)[0],
           "qwen2": make_tiny(root / "qwen2", "qwen2")[0],
           "qwen3": make_tiny(root / "qwen3", "qwen3", head_dim=32)[0]}
    out["pruned"] = write_pruned(out["llama"], root / "pruned", [0, 2, 3], {1: (False, True)})
    return out


@pytest.fixture(scope="module")
def cpp(models):
    return {name: Engine(path, max_seq=MAX_SEQ, max_batch=3) for name, path in models.items()}


def gpu(path, backend="torch", **kw):
    kw.setdefault("max_seq", MAX_SEQ)
    kw.setdefault("device", "cpu")
    return GpuEngine(path, backend=backend, **kw)


# ----------------------------------------------------------------------------- against the C++ runtime

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "pruned"])
def test_fp32_logits_and_greedy_tokens_match_the_cpp_runtime(models, cpp, arch, backend):
    # Interpreted Triton runs each program in numpy: a short context keeps decode_attention's splits few.
    eng = gpu(models[arch], backend, max_seq=32)
    ref = cpp[arch].logits(IDS_SHORT)
    assert rel_err(eng.logits(IDS_SHORT), ref) < 1e-5  # prefill: torch matmul + SDPA
    assert rel_err(eng.logits(IDS_SHORT, chunk=5), ref) < 1e-5  # prefill chunks past cached positions
    n = 6 if backend == "triton" else len(IDS_SHORT)  # one token at a time: the decode kernels
    assert rel_err(eng.logits(IDS_SHORT[:n], chunk=1), ref[:n]) < 1e-5
    want = cpp[arch].generate_ids(IDS_SHORT, max_new_tokens=16, stop=[])
    assert eng.generate_ids(IDS_SHORT, max_new_tokens=16, stop=[]) == want


def test_the_plan_keeps_kv_only_for_retained_attentions(models, cpp):
    eng = gpu(models["pruned"], max_batch=2)
    assert eng.layers_run == cpp["pruned"].layers_run == [0, 1, 2]
    assert eng.num_attention_layers == cpp["pruned"].num_attention_layers == 2
    assert tuple(eng.k_cache.shape) == (2, 2, 2, MAX_SEQ, 16)  # [slots, rows, kv heads, max_seq, head_dim]
    assert eng.layers[1].w_qkv is None and eng.layers[1].w_gate_up is not None
    dense = gpu(models["llama"], max_batch=2)
    assert eng.kv_cache_bytes * 2 == dense.kv_cache_bytes
    assert eng.weight_bytes_per_token < dense.weight_bytes_per_token
    skipped = gpu(models["llama"], skip_layers=[1, 2])
    assert skipped.layers_run == [0, 3] and skipped.num_attention_layers == 2
    ref = Engine(models["llama"], max_seq=MAX_SEQ, skip_layers=[1, 2]).logits(IDS_SHORT)
    assert rel_err(skipped.logits(IDS_SHORT, chunk=1), ref) < 1e-5


@pytest.mark.parametrize("backend,sampling", [("torch", dict()),
                                              ("triton", dict(temperature=0.9, top_k=20, top_p=0.9, seed=7))])
def test_a_sequence_in_a_batch_of_three_gives_what_it_gives_alone(models, cpp, backend, sampling):
    """Greedy (held to the C++ runtime too) and sampled: the Triton sampler draws from the same logits."""
    eng = gpu(models["qwen2"], backend, max_batch=3, max_seq=32)
    batch = eng.generate_ids(PROMPTS, max_new_tokens=6, stop=[], **sampling)
    assert batch == [eng.generate_ids(p, max_new_tokens=6, stop=[], **sampling) for p in PROMPTS]
    if not sampling:
        assert batch == cpp["qwen2"].generate_ids(PROMPTS, max_new_tokens=6, stop=[])


def test_more_prompts_than_max_batch_run_in_groups(models, cpp):
    eng = gpu(models["llama"], max_batch=2)
    assert eng.generate_ids(PROMPTS, max_new_tokens=5, stop=[]) == cpp["llama"].generate_ids(
        PROMPTS, max_new_tokens=5, stop=[])


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.03), ("int8", 0.05)])
def test_bf16_and_int8_stay_close_to_fp32(models, dtype, bound):
    ref = gpu(models["llama"]).logits(IDS_SHORT)
    eng = gpu(models["llama"], dtype=dtype)
    for chunk in (0, 1):
        out = eng.logits(IDS_SHORT, chunk=chunk)
        assert rel_err(out, ref) <= bound
        assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    fp32_bytes = gpu(models["llama"]).weight_bytes
    assert eng.weight_bytes < fp32_bytes * (0.55 if dtype == "bf16" else 0.35)


def test_sampling_is_seeded_and_top_k_one_is_greedy(models):
    eng = gpu(models["llama"])
    p = PROMPTS[1]
    a = eng.generate_ids(p, max_new_tokens=12, temperature=1.0, seed=1, stop=[])
    assert a == eng.generate_ids(p, max_new_tokens=12, temperature=1.0, seed=1, stop=[])
    assert a != eng.generate_ids(p, max_new_tokens=12, temperature=1.0, seed=2, stop=[])
    greedy = eng.generate_ids(p, max_new_tokens=12, stop=[])
    assert eng.generate_ids(p, max_new_tokens=12, temperature=1.5, top_k=1, seed=3, stop=[]) == greedy
    assert eng.generate_ids(p, max_new_tokens=12, temperature=1e-5, seed=3, stop=[]) == greedy  # below 1e-4: greedy


# ----------------------------------------------------------------------------- the CPU engine's semantics

def test_stop_tokens_strings_callbacks_and_streaming_as_the_cpu_engine(models):
    path = models["llama"]
    cpu, eng = Engine(path, max_seq=MAX_SEQ), gpu(path)
    full = cpu.generate_ids(IDS_SHORT, max_new_tokens=12, stop=[])
    stop = full[5]
    first = full.index(stop)
    for e in (cpu, eng):
        assert e.generate_ids(IDS_SHORT, max_new_tokens=12, stop=[stop]) == full[:first]
    word = cpu.tokenizer.id_to_token(stop)  # a stop given as a single-token string
    assert eng.generate_ids(IDS_SHORT, max_new_tokens=12, stop=word) == full[:first]
    with pytest.raises(ValueError, match="not a single token"):
        eng.generate_ids(IDS_SHORT, stop="not one token at all")
    seen = []  # a callback returning False stops its sequence after that token
    got = eng.generate_ids(PROMPTS[:2], max_new_tokens=6, stop=[],
                           callback=lambda seq, tok: seen.append((seq, tok)) or not (seq == 0 and len(seen) > 2))
    want = cpu.generate_ids(PROMPTS[:2], max_new_tokens=6, stop=[])
    assert got[1] == want[1] and got[0] == want[0][:len(got[0])] and 1 <= len(got[0]) < 6
    with pytest.raises(RuntimeError, match="inside this engine's own callback"):
        eng.generate_ids(IDS_SHORT, max_new_tokens=2, stop=[], callback=lambda s, t: eng.generate_ids([1], 1))
    text = "Once upon a time"
    pieces = list(eng.stream(text, max_new_tokens=12, stop=[]))
    assert "".join(pieces) == eng.generate(text, max_new_tokens=12, stop=[]) == cpu.generate(text, max_new_tokens=12,
                                                                                               stop=[])
    assert len(pieces) > 1
    it = eng.stream(text, max_new_tokens=12, stop=[])  # closing early cancels the request
    next(it)
    it.close()
    assert eng.stats()["running"] == 0 and not eng.has_work


BAD_ARGUMENTS = [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0),
                 dict(top_p=1.5), dict(seed=-3), dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(top_k=True)]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_bad_sampling_arguments_raise_the_cpu_engines_errors(models, cpp, bad):
    eng = gpu(models["llama"])
    errors = []
    for e in (cpp["llama"], eng):
        for call in (lambda: e.generate_ids(IDS_SHORT, **bad), lambda: e.submit(IDS_SHORT, **bad),
                     lambda: next(e.stream("Once", **bad))):
            with pytest.raises(ValueError) as info:
                call()
            errors.append(str(info.value))
    assert errors[:3] == errors[3:]


def test_prompts_past_the_context_and_bad_tokens_are_the_cpu_engines_errors(models):
    path = models["llama"]
    cpu, eng = Engine(path, max_seq=16), gpu(path, max_seq=16)
    long = list(range(3, 20))
    for call in (lambda e: e.generate_ids(long, max_new_tokens=1), lambda e: e.generate_ids(long[:10], max_new_tokens=7),
                 lambda e: e.submit(long[:10], max_new_tokens=7), lambda e: e.generate_ids([1, 300, 2]),
                 lambda e: e.generate_ids([]), lambda e: e.logits(long)):
        messages = []
        for e in (cpu, eng):
            with pytest.raises(ValueError) as info:
                call(e)
            messages.append(str(info.value))
        assert messages[0].endswith(messages[1]) and ("context" in messages[1] or "vocabulary" in messages[1]
                                                      or "empty" in messages[1])
    assert len(eng.generate_ids(long[:10], max_new_tokens=6, stop=[])) == 6  # exactly the context fits


def test_unsupported_combinations_are_clear_errors(models):
    path = models["llama"]
    with pytest.raises(ValueError, match="int4.*not supported by the GPU engine"):
        gpu(path, dtype="int4")
    with pytest.raises(ValueError, match="kv_dtype 'int8' is not supported by the GPU engine"):
        gpu(path, kv_dtype="int8")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        gpu(path, dtype="fp8")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        gpu(path, device="tpu")
    with pytest.raises(ValueError, match="threads applies to the CPU runtime"):
        Engine(path, device="cuda", threads=2)


# ----------------------------------------------------------------------------- --device cuda without a GPU

def test_device_cuda_without_a_gpu_is_one_clear_error_before_loading(models, monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = models["llama"].parent / "not-a-checkpoint"  # never read: the device is checked first
    for call in (lambda: shortrt.Engine(missing, device="cuda"), lambda: GpuEngine(missing, device="cuda:0"),
                 lambda: shortrt.generate(missing, "hi", device="cuda")):
        with pytest.raises(DeviceUnavailableError, match="device 'cuda(:0)?' is not usable"):
            call()
    for command in (["generate", missing, "--device", "cuda", "-p", "hi"], ["serve", missing, "--device", "cuda"]):
        rc, out, err = run_cli(command, capsys)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and "error: device 'cuda' is not usable" in err
    rc, _, err = run_cli(["generate", missing, "--device", "gpu", "-p", "hi"], capsys)
    assert rc == 2 and "expected cpu, cuda or cuda:N" in err


def test_generate_command_passes_its_flags_to_the_gpu_engine(models, monkeypatch, capsys):
    """`shortrt generate --device cuda` end to end, with the GPU engine put on CPU tensors."""
    from conftest import run_cli

    import shortrt.commands.generate as generate_command
    import shortrt.engine

    path = models["llama"]
    argv = ["generate", path, "-p", "Once upon", "-p", "The quick", "-n", "8", "--skip", "2"]
    rc, want, _ = run_cli(argv, capsys)
    made = []
    monkeypatch.setattr(generate_command, "resolve_device_dtypes", lambda args: {"device": args.device})
    monkeypatch.setattr(shortrt.engine, "Engine", lambda model, threads=None, device=None, **kw: made.append(kw) or
                        GpuEngine(model, device="cpu", **kw))
    rc2, got, _ = run_cli(argv + ["--device", "cuda"], capsys)
    assert rc == rc2 == 0 and got == want and len(got.splitlines()) == 2
    assert made[0]["skip_layers"] == [2] and made[0]["max_batch"] == 2


# ----------------------------------------------------------------------------- the request interface

def _drain(e, limit=200):
    events = []
    for _ in range(limit):
        if not e.has_work:
            break
        events += e.step()
    return events


def test_submit_step_cancel_give_the_cpu_engines_events(models):
    path = models["llama"]
    cpu, eng = Engine(path, max_seq=MAX_SEQ, max_batch=2), gpu(path, max_batch=2)
    runs = []
    for e in (cpu, eng):
        a = e.submit(PROMPTS[0], max_new_tokens=5, stop=[])
        b = e.submit(PROMPTS[1], max_new_tokens=9, stop=[])
        c = e.submit(PROMPTS[2], max_new_tokens=0)
        d = e.submit(PROMPTS[2], max_new_tokens=4, stop=[])  # waits for a free KV row
        events = e.step() + e.step()
        e.cancel(b)
        events += _drain(e)
        runs.append(([a, b, c, d], events, {k: e.stats()[k] for k in ("running", "queued", "requests_finished",
                                                                       "tokens_generated")}))
    assert runs[0] == runs[1]
    ids, events, stats = runs[1]
    assert (ids[1], -1, "cancelled") in events and (ids[2], -1, "length") in events
    assert stats["running"] == 0 and stats["requests_finished"] == 4


def test_the_async_server_loop_drives_the_gpu_engine(models):
    from shortrt.serving import AsyncEngine

    eng = gpu(models["llama"], max_batch=2)
    want = eng.generate_ids(PROMPTS[:2], max_new_tokens=6, stop=[])

    async def main():
        aeng = AsyncEngine(eng, max_queue=4)
        try:
            reqs = [await aeng.submit(p, max_new_tokens=6, stop=[]) for p in PROMPTS[:2]]
            return [await r.result() for r in reqs]
        finally:
            aeng.shutdown()

    results = asyncio.run(main())
    assert [tokens for tokens, _, _ in results] == want
    assert all(finish == "length" and text for _, text, finish in results)


# ----------------------------------------------------------------------------- on a real GPU

gpu_only = pytest.mark.gpu


@gpu_only
@pytest.mark.parametrize("arch", ["llama", "qwen3", "pruned"])
def test_cuda_fp32_gives_the_cpu_tokens_and_graphs_replay_them(models, arch):
    ref = gpu(models[arch])  # CPU tensors, kernel references (itself held to the C++ runtime above)
    cuda = GpuEngine(models[arch], device="cuda", dtype="fp32", max_seq=MAX_SEQ, max_batch=3)
    assert rel_err(cuda.logits(IDS_SHORT, chunk=1), ref.logits(IDS_SHORT)) < 1e-4
    want = ref.generate_ids(PROMPTS, max_new_tokens=16, stop=[])
    assert cuda.generate_ids(PROMPTS, max_new_tokens=16, stop=[]) == want
    assert cuda.cuda_graphs, cuda.graph_error
    assert [cuda.generate_ids(p, max_new_tokens=16, stop=[]) for p in PROMPTS] == want
    eager = GpuEngine(models[arch], device="cuda", dtype="fp32", max_seq=MAX_SEQ, cuda_graphs=False)
    assert eager.generate_ids(PROMPTS[0], max_new_tokens=16, stop=[]) == want[0]


@gpu_only
@pytest.mark.parametrize("dtype,bound", [("bf16", 0.03), ("int8", 0.05)])
def test_cuda_bf16_and_int8_stay_close_to_fp32(models, dtype, bound):
    ref = gpu(models["llama"]).logits(IDS_SHORT)
    cuda = GpuEngine(models["llama"], device="cuda", dtype=dtype, max_seq=MAX_SEQ)
    for chunk in (0, 1):
        assert rel_err(cuda.logits(IDS_SHORT, chunk=chunk), ref) <= bound
    out = cuda.generate_ids(PROMPTS[0], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3, stop=[])
    assert len(out) == 8 and all(0 <= t < 300 for t in out)


@gpu_only
def test_cuda_stream_and_sampled_batch(models):
    eng = GpuEngine(models["llama"], device="cuda", max_seq=MAX_SEQ, max_batch=3)
    text = "Once upon a time"
    assert "".join(eng.stream(text, max_new_tokens=10, stop=[])) == eng.generate(text, max_new_tokens=10, stop=[])
    s = dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    batch = eng.generate_ids(PROMPTS, max_new_tokens=8, stop=[], **s)
    assert batch == [eng.generate_ids(p, max_new_tokens=8, stop=[], **s) for p in PROMPTS]
    assert np.isfinite(eng.logits(IDS_SHORT)).all()
