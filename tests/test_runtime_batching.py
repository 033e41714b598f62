"""The request-level interface: submit / step / cancel, continuous batching over one forward
pass per step, and the promise that a request gives exactly the tokens it gives alone."""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from runtime_models import make_tiny, rel_err, write_pruned
from shortrt import _C
from shortrt.engine import KV_DTYPES, Engine

CHUNK = 8  # small, so prompts take several prefill chunks on the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("batch") / "m", num_hidden_layers=3)[0]


# (prompt, options): prompts shorter and longer than a chunk, greedy and sampled, own seeds.
REQUESTS = [
    (list(range(5, 25)), dict(max_new_tokens=12)),
    ([7, 8, 9], dict(max_new_tokens=9, temperature=0.8, seed=3)),
    (list(range(30, 70)), dict(max_new_tokens=6, temperature=1.1, top_k=20, seed=11)),
    ([42] * 9, dict(max_new_tokens=15)),
    ([3], dict(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=5)),
    (list(range(100, 117)), dict(max_new_tokens=10, temperature=0.9, seed=1)),
]


def run_all(eng: Engine, requests, *, submit_every: int = 0) -> dict[int, list[int]]:
    """Submit the requests (all at once, or one every `submit_every` steps) and step until done."""
    out, finish, pending = {}, {}, list(enumerate(requests))
    ids = {}
    steps = 0
    while pending or eng.has_work:
        if pending and (submit_every == 0 or steps % submit_every == 0):
            for k, (prompt, opts) in (pending if submit_every == 0 else pending[:1]):
                ids[eng.submit(prompt, stop=[], **opts)] = k
            pending = [] if submit_every == 0 else pending[1:]
        for rid, token, why in eng.step():
            k = ids[rid]
            if token >= 0:
                out.setdefault(k, []).append(token)
            if why is not None:
                assert k not in finish, "an event after the last one"
                finish[k] = why
        steps += 1
        assert steps < 1000
    assert sorted(finish) == list(range(len(requests)))
    return out


@contextlib.contextmanager
def kernel_path(path: str):
    """Runs the block on one kernel path ("auto": whatever the CPU picks); skips a path it lacks."""
    if path != "auto" and path not in _C.kernel_paths():
        pytest.skip(f"this CPU has no {path} kernel path")
    before = _C.kernel_active()
    _C.set_kernels(path)
    try:
        yield
    finally:
        _C.set_kernels(before)


PATHS = ["ref", "avx2", "avx512"]
# (weight dtype, kv dtype, kernel path): every kv dtype on every path with fp32 weights, and
# the packed weight formats beside an fp32 and two compact caches.
CASES = ([("fp32", kv, path) for kv in KV_DTYPES for path in PATHS] +
         [(dtype, kv, "auto") for dtype in ("bf16", "int8", "int4") for kv in ("fp32", "f16", "int8")] +
         [("int4", "fp32", path) for path in ("avx2", "avx512")])


def check_batched_equal_alone(model, dtype, kv_dtype):
    alone = Engine(model, dtype=dtype, kv_dtype=kv_dtype, max_seq=128, max_batch=1, prefill_chunk=CHUNK, threads=2)
    expected = {k: alone.generate_ids(p, stop=[], **o) for k, (p, o) in enumerate(REQUESTS)}
    assert all(len(expected[k]) == o["max_new_tokens"] for k, (_, o) in enumerate(REQUESTS))
    eng = Engine(model, dtype=dtype, kv_dtype=kv_dtype, max_seq=128, max_batch=4, prefill_chunk=CHUNK, threads=2)
    assert run_all(eng, REQUESTS) == expected                   # 6 requests, 4 regions: two wait
    assert run_all(eng, REQUESTS, submit_every=3) == expected   # arriving while others decode
    one_thread = Engine(model, dtype=dtype, kv_dtype=kv_dtype, max_seq=128, max_batch=3, prefill_chunk=CHUNK,
                        threads=1)
    assert run_all(one_thread, REQUESTS[::-1]) == {len(REQUESTS) - 1 - k: v for k, v in expected.items()}
    return expected


@pytest.mark.parametrize("dtype,kv_dtype,path", CASES)
def test_batched_requests_equal_each_alone(tiny, dtype, kv_dtype, path):
    with kernel_path(path):
        check_batched_equal_alone(tiny, dtype, kv_dtype)


@pytest.fixture(scope="module")
def attention_pruned(tiny, tmp_path_factory):
    """3 layers, the middle one without its attention: 2 KV slots for 3 layers."""
    return write_pruned(tiny, tmp_path_factory.mktemp("attn") / "m", keep=[0, 1, 2], flags={1: (False, True)})


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_attention_pruned_checkpoint_on_every_kv_dtype(tiny, attention_pruned, kv_dtype):
    """Remapped KV slots (fewer than layers): regions sized for 2 slots, a request batched gives
    its tokens alone, and the logits stay near the fp32 cache's (the same tolerances as the
    default model's: tests/test_runtime_kv_dtype.py)."""
    eng = Engine(attention_pruned, kv_dtype=kv_dtype, max_seq=64, max_batch=2)
    assert (eng.num_layers, eng.num_attention_layers) == (3, 2)
    assert eng.kv_cache_bytes == 2 * 2 * 2 * 64 * 2 * _C.kv_row_bytes(kv_dtype, 16)  # K,V x slots x regions x pos x kv heads
    check_batched_equal_alone(attention_pruned, "fp32", kv_dtype)
    ids = list(range(3, 60))
    fp32 = Engine(attention_pruned, max_seq=64).logits(ids)
    tolerance = {"fp32": 0, "f16": 2e-3, "bf16": 2e-2, "int8": 0.1}[kv_dtype]
    assert rel_err(eng.logits(ids), fp32) <= tolerance
    np.testing.assert_allclose(eng.logits(ids, chunk=1), eng.logits(ids), rtol=0, atol=5 * tolerance + 1e-4)


def test_generate_is_the_step_loop(tiny):
    eng = Engine(tiny, max_seq=128, max_batch=3, prefill_chunk=CHUNK)
    prompts = [p for p, _ in REQUESTS[:3]]
    batch = eng.generate_ids(prompts, max_new_tokens=8, stop=[])
    by_steps = run_all(eng, [(p, dict(max_new_tokens=8)) for p in prompts])
    assert batch == [by_steps[k] for k in range(3)]


def test_decoding_continues_while_a_prompt_prefills(tiny):
    """Continuous, not static, batching: a running request gets a token in every step while a
    newcomer's long prompt is prefilled chunk by chunk in the same steps."""
    eng = Engine(tiny, max_seq=128, max_batch=2, prefill_chunk=CHUNK)
    a = eng.submit([5, 6, 7], max_new_tokens=40, stop=[])
    for _ in range(3):
        eng.step()
    b = eng.submit(list(range(10, 50)), max_new_tokens=5, stop=[])  # 40 tokens: 5 chunks
    for i in range(5):
        events = eng.step()
        assert [e[0] for e in events if e[0] == a and e[1] >= 0] == [a], f"step {i}: {events}"
        assert (b in [e[0] for e in events]) == (i == 4)  # b's first token after its last chunk
    eng.cancel(a)
    eng.cancel(b)
    eng.step()
    assert not eng.has_work


def test_queue_waits_for_a_free_region_and_finish_reasons(tiny):
    eng = Engine(tiny, max_seq=64, max_batch=2, prefill_chunk=CHUNK)
    first = eng.generate_ids([9, 10, 11], max_new_tokens=6, stop=[])
    stop_token = first[2]
    assert stop_token not in first[:2]  # so the stop lands on the third token exactly
    ids = [eng.submit([9, 10, 11], max_new_tokens=6, stop=[stop_token]),  # stops at its third token
           eng.submit([9, 10, 11], max_new_tokens=4, stop=[]),
           eng.submit([1, 2], max_new_tokens=0),
           eng.submit([3, 4], max_new_tokens=3, stop=[])]
    s = eng.stats()
    assert (s["running"], s["queued"], s["max_batch"]) == (0, 3, 2)  # max_new_tokens=0 never queues
    events = []
    while eng.has_work:
        events += eng.step()
        assert eng.stats()["running"] <= 2
    by_id = {i: [(t, w) for r, t, w in events if r == i] for i in ids}
    assert by_id[ids[0]] == [(first[0], None), (first[1], None), (-1, "stop")]
    assert by_id[ids[1]] == [(t, None) for t in first[:3]] + [(first[3], "length")]
    assert by_id[ids[2]] == [(-1, "length")]
    assert [w for _, w in by_id[ids[3]]] == [None, None, "length"]
    s = eng.stats()
    assert (s["running"], s["queued"], s["requests_finished"], s["kv_bytes_used"]) == (0, 0, 5, 0)  # + generate


def test_cancel_frees_the_region_at_once(tiny):
    eng = Engine(tiny, max_seq=64, max_batch=1, prefill_chunk=CHUNK)
    a = eng.submit([5, 6], max_new_tokens=50, stop=[])
    b = eng.submit([7, 8], max_new_tokens=3, stop=[])
    eng.step()
    s = eng.stats()
    assert (s["running"], s["queued"], s["kv_bytes_used"]) == (1, 1, s["kv_bytes"])
    eng.cancel(a)
    assert eng.stats()["running"] == 0  # no step in flight: freed now
    events = eng.step()
    assert (a, -1, "cancelled") in events and any(r == b and t >= 0 for r, t, _ in events)
    eng.cancel(12345)  # unknown: ignored
    queued = eng.submit([1], max_new_tokens=5, stop=[])
    eng.cancel(queued)  # still queued
    while eng.has_work:
        events += eng.step()
    assert (queued, -1, "cancelled") in events and [w for r, _, w in events if r == b][-1] == "length"


def test_submit_and_cancel_from_other_threads_while_steps_run(tiny):
    eng = Engine(tiny, max_seq=256, max_batch=4, prefill_chunk=CHUNK)
    events, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            events.extend(eng.step())
            time.sleep(0.005)  # slow enough that the long requests are still running when cancelled

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        long_ids = [eng.submit(list(range(5, 20)), max_new_tokens=240, stop=[]) for _ in range(3)]
        short = eng.submit([4, 5, 6], max_new_tokens=5, stop=[])
        deadline = time.time() + 20
        while not any(r == short and w == "length" for r, _, w in events):
            assert time.time() < deadline
            time.sleep(0.005)
        for rid in long_ids:
            eng.cancel(rid)
        while not all(any(r == rid and w == "cancelled" for r, _, w in list(events)) for rid in long_ids):
            assert time.time() < deadline
            time.sleep(0.005)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert eng.stats()["running"] == 0
    for rid in long_ids:  # in order: tokens, then exactly one last event
        mine = [w for r, _, w in events if r == rid]
        assert mine[-1] == "cancelled" and mine.count("cancelled") == 1 and set(mine[:-1]) <= {None}


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=60), "prompt of 10 tokens \\+ 60 new tokens exceeds the context of 64"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"),
])
def test_bad_requests_are_refused_at_submit(tiny, kwargs, message):
    eng = Engine(tiny, max_seq=64, max_batch=2)
    with pytest.raises(ValueError, match=message):
        eng.submit(list(range(10)), **kwargs)
    assert not eng.has_work


def test_step_budget_must_fit_a_chunk_beside_every_decoder(tiny):
    with pytest.raises(Exception, match="step_tokens 10 is less than max_batch \\+ prefill_chunk = 12"):
        Engine(tiny, max_batch=4, prefill_chunk=8, step_tokens=10)
    eng = Engine(tiny, max_batch=4, prefill_chunk=8)
    assert (eng.prefill_chunk, eng.step_tokens) == (8, 12)


def test_kv_pool_sized_by_a_byte_budget(tiny):
    from shortrt.engine import kv_bytes_per_sequence

    per_seq = kv_bytes_per_sequence(tiny, max_seq=64)
    assert per_seq == 2 * 4 * 3 * 64 * 2 * 16  # K and V, fp32, 3 attentions, 64 positions, 2 kv heads x 16
    eng = Engine(tiny, max_seq=64, kv_budget_bytes=3 * per_seq + per_seq // 2)
    assert eng.max_batch == 3 and eng.kv_cache_bytes == 3 * per_seq <= 3.5 * per_seq
    assert eng.stats()["kv_bytes"] == 3 * per_seq
    assert kv_bytes_per_sequence(tiny, max_seq=64, skip_layers=[1]) == per_seq * 2 // 3
    with pytest.raises(ValueError, match="holds no sequence: one needs"):
        Engine(tiny, max_seq=64, kv_budget_bytes=per_seq - 1)


def test_kv_pool_sized_in_the_kv_dtype_bytes(tiny):
    """f16 / bf16 regions take exactly half of fp32's bytes, int8 a quarter plus one fp32 scale
    per (kv head, position) row of 16 for K and for V: a budget holds 2x / ~3.2x the sequences."""
    from shortrt.engine import kv_bytes_per_sequence

    fp32 = kv_bytes_per_sequence(tiny, max_seq=64)
    per_seq = {kv: kv_bytes_per_sequence(tiny, max_seq=64, kv_dtype=kv) for kv in KV_DTYPES}
    assert per_seq == {"fp32": fp32, "f16": fp32 // 2, "bf16": fp32 // 2,
                       "int8": 2 * 3 * 64 * 2 * (16 + 4)}  # K and V, 3 slots, 64 positions, 2 kv heads
    for kv in KV_DTYPES:
        eng = Engine(tiny, max_seq=64, kv_dtype=kv, kv_budget_bytes=3 * fp32)
        assert eng.max_batch == 3 * fp32 // per_seq[kv]
        assert eng.kv_cache_bytes == eng.stats()["kv_bytes"] == eng.max_batch * per_seq[kv]
        assert eng.kv_dtype == kv and f"kv_dtype={kv!r}" in repr(eng)
    assert Engine(tiny, max_seq=64, kv_dtype="f16", kv_budget_bytes=3 * fp32).max_batch == 6
    with pytest.raises(ValueError, match="unknown kv_dtype 'fp16' \\(expected one of fp32, f16, bf16, int8\\)"):
        kv_bytes_per_sequence(tiny, kv_dtype="fp16")


@pytest.mark.parametrize("bad", ["fp16", "F16", "int4", ""])
def test_bad_kv_dtype_is_refused(tiny, bad):
    with pytest.raises(ValueError, match=f"unknown kv_dtype '{bad}' \\(expected one of fp32, f16, bf16, int8\\)"):
        Engine(tiny, kv_dtype=bad)
    with pytest.raises(ValueError, match=f"unknown kv_dtype '{bad}' \\(expected fp32, f16, bf16 or int8\\)"):
        _C.Engine(str(tiny), "fp32", 1, 64, 1, [], 0, 0, bad)  # the C++ engine's own check
