"""The OpenAI-compatible server (shortrt/server.py) over HTTP on 127.0.0.1: the official `openai`
client and plain httpx against uvicorn on a free port.

HTTP-layer checks (validation, error bodies, SSE framing, 429, /health, /metrics) run over the
fake engine of fake_engine.py; every check of what the server generates runs the real engine
on a tiny random model and compares with Engine.generate_ids run alone."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fake_engine import FakeEngine
from runtime_models import make_tiny, save_tiny_tokenizer
from shortrt.server import create_app

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


class Serving:
    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self):
        return self.app.state.shortrt

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def wait_loaded(self):
        assert self.state.loaded.wait(60)
        assert self.state.load_error is None, self.state.load_error
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


@pytest.fixture(scope="module")
def fake_server(tokenizer):
    """The HTTP layer over a fake engine: 2 KV regions, a queue of 1, 64 tokens of context."""
    engine = FakeEngine(tokenizer, max_batch=2, max_seq=64, step_s=0.005)
    with Serving(create_app(lambda: engine, model_name="fake", aliases=["fake-alias"], max_queue=1)) as s:
        s.engine = engine
        yield s.wait_loaded()


def post(server, path, body, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


# ----------------------------------------------------------------------------- HTTP layer

def test_health_is_503_until_the_model_is_loaded(tokenizer):
    gate = threading.Event()

    def load():
        gate.wait(20)
        return FakeEngine(tokenizer)
    with Serving(create_app(load, model_name="slow")) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = post(s, "/v1/completions", {"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        s.wait_loaded()
        assert httpx.get(s.url + "/health").status_code == 200


def test_stopping_while_the_model_loads_does_not_wait_for_it(tokenizer):
    gate = threading.Event()
    s = Serving(create_app(lambda: gate.wait(30) and FakeEngine(tokenizer), model_name="slow")).__enter__()
    t0 = time.monotonic()
    s.__exit__(None, None, None)
    assert time.monotonic() - t0 < 5
    gate.set()
    assert s.state.loaded.wait(5) and s.state.aeng is None  # the late engine is never started


LONG = list(range(3, 70))  # 67 token ids: past the fake's 64-token context


@pytest.mark.parametrize("path,body,param,phrase", [
    ("/v1/completions", b"{not json", None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", None, "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, "prompt", "`prompt` is required"),
    ("/v1/chat/completions", {"prompt": "hi"}, "messages", "`messages` is required"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages", "content` must be a string"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature", "must be a number in [0, inf]"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p", "in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p", "in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "top_k": -1}, "top_k", "must be an integer in [0, inf]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "must be an integer in [1, inf]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 63}, "max_tokens", "exceeds the context of 64"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n", "`n` must be 1"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop", "string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", 1]}, "stop", "string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-5"}, "model", "is not served here"),
    ("/v1/completions", {"prompt": LONG}, "prompt", "leaves no room to generate in the context of 64"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages", "no chat template"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": [1, 999]}, "prompt", "must be in [0, 300)"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, "seed", "must be an integer in [0,"),
])
def test_bad_requests_are_400_naming_the_field(fake_server, path, body, param, phrase):
    r = post(fake_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert phrase in err["message"]


def test_unknown_route_has_an_openai_error_body(fake_server):
    r = httpx.get(fake_server.url + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_sse_framing_and_usage(fake_server, tokenizer):
    body = {"model": "fake-alias", "prompt": [7, 8, 9], "max_tokens": 6, "stream": True, "seed": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fake_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == tokenizer.decode([FakeEngine.token([7, 8, 9], i) for i in range(6)])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6,
                                                                   "total_tokens": 9}


def test_full_queue_is_429_then_capacity_returns(fake_server):
    async def go():
        async with httpx.AsyncClient(base_url=fake_server.url, timeout=30) as client:
            body = {"prompt": [1, 2], "max_tokens": 60, "stream": True}
            streams = []
            for i in range(3):  # 2 running + 1 waiting = full
                cm = client.stream("POST", "/v1/completions", json=body)
                r = await cm.__aenter__()
                assert r.status_code == 200
                streams.append(cm)
            over = await client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
            for cm in streams:
                await cm.__aexit__(None, None, None)  # disconnect: each request is cancelled
            await asyncio.sleep(0.2)
            after = await client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
            return over, after
    over, after = asyncio.run(go())
    assert over.status_code == 429
    err = over.json()["error"]
    assert err["code"] == "queue_full" and "at capacity: 2 requests running and 1 waiting" in err["message"]
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"


def test_a_failing_engine_ends_the_stream_with_an_error_event(fake_server):
    with httpx.stream("POST", fake_server.url + "/v1/completions", timeout=30,
                      json={"prompt": [4], "max_tokens": 50, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        fake_server.engine.fail_next_step = RuntimeError("kernel exploded")
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    assert "kernel exploded" in json.loads(rest[-2][len("data: "):])["error"]["message"]


def test_models_and_metrics(fake_server):
    models = httpx.get(fake_server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    assert models["data"][0]["max_model_len"] == 64
    post(fake_server, "/v1/completions", {"prompt": [3], "max_tokens": 4})
    post(fake_server, "/v1/completions", {"prompt": [3], "top_p": 9})
    r = httpx.get(fake_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if not ln.startswith("#")}
    assert values['shortrt_requests_total{endpoint="completions",status="200"}'] >= 1
    assert values['shortrt_requests_total{endpoint="completions",status="400"}'] >= 1
    assert values["shortrt_tokens_generated_total"] >= 4
    for name in ("shortrt_sequences_running", "shortrt_sequences_queued", "shortrt_kv_regions_used",
                 "shortrt_kv_bytes_used", "shortrt_kv_bytes"):
        assert name in values and f"# TYPE {name} gauge" in text
    assert values["shortrt_kv_regions"] == 2


# ----------------------------------------------------------------------------- the real engine

class Slowed:
    """The real engine with a pause before each step, so a request is still running when a
    test disconnects (the tiny model would finish it within milliseconds)."""

    def __init__(self, engine, pause_s: float):
        self._engine, self._pause_s = engine, pause_s

    def step(self):
        time.sleep(self._pause_s)
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_tiny(tmp_path_factory.mktemp("serve") / "m", tokenizer=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def ref(tiny):
    """The same checkpoint in its own engine: what a request gives when run alone."""
    from shortrt.engine import Engine

    return Engine(tiny, threads=1)


@pytest.fixture(scope="module")
def real_server(tiny):
    from shortrt.engine import Engine

    engine = Engine(tiny, threads=1, max_batch=8)
    with Serving(create_app(lambda: Slowed(engine, 0.002), model_name="tiny", max_queue=32)) as s:
        s.engine = engine
        yield s.wait_loaded()


@pytest.fixture(scope="module")
def client(real_server):
    import openai

    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)


def expected(ref, ids, n, **sampling):
    out = ref.generate_ids(ids, max_new_tokens=n, **sampling)
    return out, ref.decode(out), "length" if len(out) == n else "stop"


def test_openai_completion_equals_the_engine_alone(client, ref):
    prompt = "Once upon a time"
    ids = ref.encode(prompt)
    tokens, text, finish = expected(ref, ids, 40)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_openai_chat_uses_the_chat_template(client, ref):
    ids = ref.encode("Hi there", chat=True)
    tokens, text, finish = expected(ref, ids, 30)
    messages = [{"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_sampling_parameters_reach_the_engine(client, ref):
    ids = [1, 40, 41, 42]
    sampling = dict(temperature=0.9, top_p=0.8, top_k=20, seed=11)
    tokens, text, _ = expected(ref, ids, 24, **sampling)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0.9, top_p=0.8, seed=11,
                                  extra_body={"top_k": 20})
    assert r.choices[0].text == text and r.usage.completion_tokens == len(tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_from_the_text(client, ref, stream):
    ids = [1, 60, 61]
    _, text, _ = expected(ref, ids, 60, stop=[])
    stop = text[12:15]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=60, temperature=0, stop=[stop, "zzzz"],
                                  stream=stream, extra_body={"ignore_eos": True})
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == text[:text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_load_32_requests_at_concurrency_8_equal_each_alone(real_server, ref):
    import random

    import openai

    rng = random.Random(0)
    jobs = [([1] + [rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))], rng.randrange(8, 48), i % 2 == 0)
            for i in range(32)]
    want = [expected(ref, ids, n) for ids, n, _ in jobs]

    async def go():
        aclient = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)
        gate = asyncio.Semaphore(8)

        async def one(ids, n, stream):
            async with gate:
                r = await aclient.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0,
                                                     stream=stream)
                if not stream:
                    return r.choices[0].text, r.choices[0].finish_reason
                chunks = [c async for c in r]
                return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        try:
            return await asyncio.gather(*(one(*job) for job in jobs))
        finally:
            await aclient.close()
    got = asyncio.run(go())
    assert got == [(text, finish) for _, text, finish in want]
    stats = real_server.engine.stats()
    assert stats["running"] == stats["queued"] == stats["kv_regions_used"] == 0


def wait_idle(server, timeout_s=5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.engine.stats()
        if stats["kv_regions_used"] == 0 and stats["running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_kv_region(real_server):
    finished = real_server.state.finish_counts.get("cancelled", 0)
    before = real_server.engine.stats()["tokens_generated"]
    with httpx.stream("POST", real_server.url + "/v1/completions", timeout=30,
                      json={"prompt": [1, 5, 6], "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert real_server.engine.stats()["kv_regions_used"] == 1
    stats = wait_idle(real_server)  # leaving the block closed the connection mid-stream
    assert stats["kv_regions_used"] == 0 and stats["kv_bytes_used"] == 0
    assert real_server.state.finish_counts["cancelled"] == finished + 1
    assert stats["tokens_generated"] - before < 200  # the engine stopped it
    text = httpx.get(real_server.url + "/metrics").text
    assert "shortrt_kv_regions_used 0" in text


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_kv_region(real_server):
    before = real_server.engine.stats()["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(real_server.url + "/v1/completions", timeout=httpx.Timeout(30, read=0.1),
                   json={"prompt": [1, 5, 6], "max_tokens": 200, "ignore_eos": True})
    stats = wait_idle(real_server)
    assert stats["kv_regions_used"] == 0
    assert stats["tokens_generated"] - before < 200  # cancelled, not run to the end


def test_metrics_count_real_requests(real_server, client):
    client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
              for ln in httpx.get(real_server.url + "/metrics").text.splitlines() if not ln.startswith("#")}
    assert values["shortrt_kv_regions"] == 8 and values["shortrt_kv_bytes"] == real_server.engine.stats()["kv_bytes"]
    assert values["shortrt_tokens_generated_total"] == real_server.engine.stats()["tokens_generated"]
    assert values['shortrt_requests_finished_total{reason="length"}'] >= 1


# ----------------------------------------------------------------------------- the command

def test_serve_refuses_a_busy_port_in_one_line(tiny, capsys):
    from shortrt.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc = main(["serve", str(tiny), "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot listen on 127.0.0.1:" in err and err.count("\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_answers_and_stops_cleanly_on_a_signal(tiny, sig):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "shortrt", "serve", str(tiny), "--port", "0", "--threads", "1",
                             "--max-batch", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()
        url = first.split(" on ", 1)[1].split()[0]
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert f"stopped by {sig.name}" in proc.stderr.read()
    finally:
        proc.kill()


# ----------------------------------------------------------------------------- benchmarks/serving.py

def test_serving_benchmark_sweeps_a_real_server_and_records_a_crash_as_a_failed_row(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serving as bench

    path, _ = make_tiny(tmp_path / "m", tokenizer=True, max_position_embeddings=512)
    args = bench.parse_args(["--concurrency", "1,2", "--new-tokens", "8", "--prompt-tokens", "16", "--rounds", "1",
                             "--per-client", "1", "--threads", "1"])
    prompts = [[1] + list(range(10 + i, 25 + i)) for i in range(4)]
    job = {"label": "shortrt fp32", "engine": "shortrt", "dtype": "fp32", "variant": "dense", "removed": 0,
           "path": str(path)}
    spec = {"path": str(path), "dtype": "fp32", "threads": 1, "context": args.context, "new_tokens": 8,
            "prompts": prompts[:2]}
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    row = bench.run_server(job, args, prompts, tmp_path, False, lambda: bench.run_inprocess(spec, 120))
    assert "failed" not in row, row
    assert row["exit_code"] == 0 and set(row["by_clients"]) == {"1", "2"}
    assert row["by_clients"]["2"]["output_tokens"] == 16 and row["by_clients"]["2"]["output_tok_s"] > 0
    assert row["inprocess"]["output_tokens"] == 16

    crash = "import os, signal, sys; print('loading the model', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(bench, "shortrt_command", lambda *a: [sys.executable, "-c", crash])
    failed = bench.run_server({**job, "variant": "shortgpt", "removed": 1}, args, prompts, tmp_path, False)
    assert failed["failed"] == "the server exited (killed by SIGSEGV)" and "loading the model" in failed["stderr_tail"]

    class Dense:
        name = "tiny"
    md = bench.render_markdown([row, failed], args, Dense, ["llama-server: not given"])
    assert "| shortrt fp32 | dense | 2 |" in md and "FAILED: the server exited (killed by SIGSEGV)" in md
    bench.plot([row], tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 0


# ----------------------------------------------------------------------------- compact KV cache

@pytest.mark.parametrize("kv_dtype", ["f16", "int8"])
def test_requests_on_a_compact_kv_cache_equal_each_alone(tiny, kv_dtype):
    """Per-request regions of an f16 / int8 cache: 8 concurrent requests over 4 regions each get
    what the same cache gives them alone, and /metrics reports the cache's real bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from shortrt.engine import Engine

    alone = Engine(tiny, threads=1, kv_dtype=kv_dtype)
    engine = Engine(tiny, threads=1, max_batch=4, kv_dtype=kv_dtype)
    assert engine.kv_cache_bytes == 4 * alone.kv_cache_bytes
    jobs = [([1] + list(range(3 + 7 * i, 3 + 7 * i + 5 + 3 * i)), 10 + 2 * i) for i in range(8)]
    want = [expected(alone, ids, n)[1:] for ids, n in jobs]
    with Serving(create_app(lambda: engine, model_name="tiny", max_queue=32)) as s:
        s.wait_loaded()

        def one(job):
            r = httpx.post(s.url + "/v1/completions", timeout=60,
                           json={"prompt": job[0], "max_tokens": job[1], "temperature": 0}).json()
            return r["choices"][0]["text"], r["choices"][0]["finish_reason"]

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, jobs)) == want
        metrics = httpx.get(s.url + "/metrics").text
    assert f"shortrt_kv_bytes {engine.kv_cache_bytes}" in metrics
