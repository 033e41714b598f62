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
