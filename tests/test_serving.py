"""AsyncEngine (shortrt/serving.py): order, stop strings, cancellation, the bounded queue, faults,
shutdown (on a fake engine with the request API), and stop-string cutting on its own."""
from __future__ import annotations

import asyncio
import time

import pytest

from fake_engine import FakeEngine
from runtime_models import save_tiny_tokenizer
from shortrt.serving import AsyncEngine, EngineClosed, Output, QueueFull, RequestFailed, _StopStrings


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


@pytest.fixture
def fake(tokenizer):
    return FakeEngine(tokenizer, max_batch=2)


def run(coro_fn, engine, **kw):
    """Runs coro_fn(aeng) on a fresh event loop over an AsyncEngine of `engine`, then shuts it down."""
    aeng = AsyncEngine(engine, **kw)

    async def main():
        return await asyncio.wait_for(coro_fn(aeng), 10)
    try:
        return asyncio.run(main())
    finally:
        aeng.shutdown()


def test_outputs_in_order_with_text(fake, tokenizer):
    prompt = [5, 6, 7]

    async def go(aeng):
        req = await aeng.submit(prompt, max_new_tokens=9)
        outs = [o async for o in req]
        return req, outs
    req, outs = run(go, fake)
    want = [FakeEngine.token(prompt, i) for i in range(9)]
    assert [o.token for o in outs] == want == req.tokens
    assert [o.finish for o in outs] == [None] * 8 + ["length"]
    assert "".join(o.text for o in outs) == tokenizer.decode(want, skip_special_tokens=True)
    assert req.finish == "length"


def test_stop_token_ends_without_an_output_token(tokenizer):
    async def go(aeng):
        return await (await aeng.submit([9], max_new_tokens=20)).result()
    tokens, _, finish = run(go, FakeEngine(tokenizer, eos_at=4))
    assert len(tokens) == 4 and finish == "stop"


def test_many_requests_at_once_each_get_their_own_tokens(fake):
    prompts = [[i, i + 1] for i in range(7)]  # more than max_batch (2) + max_queue: some wait

    async def go(aeng):
        reqs = [await aeng.submit(p, max_new_tokens=5 + i) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(r.result() for r in reqs))
    results = run(go, fake, max_queue=8)
    for i, (p, (tokens, _, finish)) in enumerate(zip(prompts, results)):
        assert tokens == [FakeEngine.token(p, j) for j in range(5 + i)] and finish == "length"
    assert fake.stats()["running"] == fake.stats()["queued"] == 0


def test_stop_string_cuts_the_text_and_frees_the_region(fake, tokenizer):
    prompt = [3, 4]
    full = tokenizer.decode([FakeEngine.token(prompt, i) for i in range(30)], skip_special_tokens=True)
    stop = full[10:13]
    cut = full[:full.index(stop)]

    async def go(aeng):
        req = await aeng.submit(prompt, max_new_tokens=30, stop_strings=[stop, "never-there"])
        pieces = [o.text async for o in req]
        await asyncio.sleep(0.05)  # a step or two: the engine reports the cancel
        return req, pieces, aeng.stats()
    req, pieces, stats = run(go, fake)
    assert "".join(pieces) == cut and req.finish == "stop"
    assert len(req.tokens) < 30
    assert stats["running"] == 0 and stats["kv_regions_used"] == 0


@pytest.mark.parametrize("pieces,stops,released,stopped", [
    (["Hel", "lo wor", "ld"], ["o w"], "Hell", True),
    (["ab", "c", "d"], ["cd"], "abc"[:2], True),
    (["x<", "/s", "> tail"], ["</s>"], "x", True),
    (["x<", "/t", "ail"], ["</s>"], "x</tail", False),  # a held-back prefix that was not one
    (["a", "b"], [], "ab", False),
])
def test_stop_strings_hold_back_a_possible_start(pieces, stops, released, stopped):
    s = _StopStrings(stops)
    out, hit = "", False
    for i, p in enumerate(pieces):
        text, hit = s.feed(p, final=i == len(pieces) - 1)
        out += text
        if hit:
            break
    assert (out, hit) == (released, stopped)


def test_leaving_the_iteration_cancels_and_frees_the_region(fake):
    async def go(aeng):
        req = await aeng.submit([1, 2], max_new_tokens=10_000 // 200)
        async for out in req:
            if len(req.tokens) == 3:
                break
        await asyncio.sleep(0.05)
        return req, aeng.stats()
    fake.max_seq = 1000
    req, stats = run(go, fake)
    assert len(req.tokens) == 3
    assert stats["running"] == 0 and stats["kv_regions_used"] == 0


def test_full_queue_raises_and_capacity_comes_back(fake):
    async def go(aeng):
        held = [await aeng.submit([i], max_new_tokens=50) for i in range(3)]  # 2 running + 1 waiting
        with pytest.raises(QueueFull, match="at capacity: 2 requests running and 1 waiting"):
            await aeng.submit([9], max_new_tokens=5)
        held[0].cancel()
        await asyncio.sleep(0.05)
        again = await aeng.submit([9], max_new_tokens=5)
        for r in held[1:]:
            r.cancel()
        return await again.result()
    assert run(go, fake, max_queue=1)[2] == "length"


def test_engine_validation_error_reaches_the_caller(fake):
    async def go(aeng):
        with pytest.raises(ValueError, match="exceeds the context of 64"):
            await aeng.submit([1] * 60, max_new_tokens=10)
        return await (await aeng.submit([1], max_new_tokens=2)).result()  # the loop carries on
    assert run(go, fake)[2] == "length"


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(fake):
    async def go(aeng):
        req = await aeng.submit([1], max_new_tokens=40)
        fake.fail_next_step = RuntimeError("kernel exploded")
        with pytest.raises(RequestFailed, match="kernel exploded"):
            await req.result()
        return await (await aeng.submit([1], max_new_tokens=3)).result()
    assert run(go, fake)[2] == "length"


def test_idle_loop_sleeps(fake):
    async def go(aeng):
        await (await aeng.submit([1], max_new_tokens=3)).result()
        before = fake.steps
        await asyncio.sleep(0.1)
        return before, fake.steps
    before, after = run(go, fake)
    assert after == before


def test_shutdown_ends_every_request_and_joins(fake):
    fake.max_seq = 10_000

    async def go(aeng):
        reqs = [await aeng.submit([i], max_new_tokens=5000) for i in range(3)]  # one of them waiting
        first = [await reqs[i]._queue.get() for i in range(2)]
        assert all(isinstance(o, Output) for o in first)
        t0 = time.perf_counter()
        await asyncio.to_thread(aeng.shutdown)
        assert time.perf_counter() - t0 < 2 and not aeng._thread.is_alive()
        for r in reqs:
            with pytest.raises(EngineClosed):
                await r.result()
        with pytest.raises(EngineClosed):
            await aeng.submit([1], max_new_tokens=2)
        return fake.stats()
    stats = run(go, fake)
    assert stats["running"] == stats["queued"] == 0
