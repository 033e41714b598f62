"""The OpenAI-compatible HTTP server: FastAPI routes over shortrt.serving.AsyncEngine.

    app = create_app(lambda: Engine(ckpt, max_batch=8), model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (`stream: true` gives server-sent
events: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`), GET /v1/models, GET /health
(503 while the model loads, then 200), GET /metrics (Prometheus text). Bad input is an HTTP
400 with OpenAI's error object naming the field; a full queue is a 429. This module only
parses, queues and streams: the batching is the engine's step loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ShortrtError
from .serving import AsyncEngine, EngineClosed, QueueFull, chat_template

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
SEED_MAX = 2**64 - 1
# Fields whose non-default values this server does not implement: refused, never silently ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto")}
# The engine's ValueError names its argument; the client knows it by the API's name.
ENGINE_PARAMS = {"max_new_tokens": "max_tokens", "prompt": "prompt", "temperature": "temperature",
                 "top_k": "top_k", "top_p": "top_p", "seed": "seed", "stop": "stop"}


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- request parsing

def _number(body: dict, name: str, default, *, lo=-math.inf, hi=math.inf, lo_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _invalid(name, f"`{name}` must be {kind}, got {json.dumps(value)}", "invalid_type")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _invalid(name, f"`{name}` must be {kind} in {left}{lo:g}, {hi:g}], got {value}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise _invalid(name, f"`{name}` must be true or false, got {json.dumps(value)}", "invalid_type")
    return bool(value)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop", f"`stop` must be a string or a list of strings, got {json.dumps(stop)}", "invalid_type")
    return [s for s in stop if s]


def _sampling(body: dict) -> dict:
    """The request's sampling options, in the engine's names (max_new_tokens is set later)."""
    for name, defaults in UNSUPPORTED.items():
        if body.get(name) not in defaults:
            raise _invalid(name, f"`{name}` is not supported by this server", "unsupported_parameter")
    n = _number(body, "n", 1, lo=1, integer=True)
    if n != 1:
        raise _invalid("n", f"`n` must be 1 (one completion per request), got {n}", "unsupported_value")
    seed = _number(body, "seed", None, lo=0, hi=SEED_MAX, integer=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _invalid("stream_options", "`stream_options` must be an object like {\"include_usage\": true}",
                       "invalid_type")
    return {
        "temperature": float(_number(body, "temperature", 1.0, lo=0.0)),
        "top_p": float(_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)),
        "top_k": _number(body, "top_k", 0, lo=0, integer=True),  # an extension (vLLM and llama.cpp have it too)
        "seed": random.getrandbits(63) if seed is None else seed,
        "stop_strings": _stop_strings(body),
        "ignore_eos": _flag(body, "ignore_eos"),  # an extension (vLLM, llama.cpp): generate max_tokens tokens
        "stream": _flag(body, "stream"),
        "include_usage": bool(options.get("include_usage", False)),
    }


def _max_tokens(body: dict, name: str, prompt_len: int, context: int, default: int | None, prompt_param: str) -> int:
    left = context - prompt_len
    if left < 1:
        raise _invalid(prompt_param, f"the prompt is {prompt_len} tokens: it leaves no room to generate in the "
                                     f"context of {context} tokens", "context_length_exceeded")
    value = _number(body, name, None, lo=1, integer=True)
    if value is None:
        return left if default is None else min(default, left)
    if value > left:
        raise _invalid(name, f"prompt of {prompt_len} tokens + `{name}` {value} exceeds the context of "
                             f"{context} tokens", "context_length_exceeded")
    return value


def _message_text(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _invalid("messages", f"`{where}` must be an object with `role` and `content`", "invalid_type")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant", "developer", "tool"):
        raise _invalid("messages", f"`{where}.role` must be system, user, assistant or tool, got {json.dumps(role)}")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _invalid("messages", f"`{where}.content` parts must be {{\"type\": \"text\", \"text\": ...}} "
                                       "(this server takes text only)")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise _invalid("messages", f"`{where}.content` must be a string, got {json.dumps(content)}", "invalid_type")
    return {"role": "system" if role == "developer" else role, "content": content}


# ----------------------------------------------------------------------------- the app's state

class ServerState:
    """The loaded engine (None while loading) and the counters /metrics reports."""

    def __init__(self, load, model_name: str, aliases, max_queue: int, on_load_error=None):
        self.load, self.model_name, self.max_queue = load, model_name, max_queue
        self.names = {model_name, *aliases}
        self.on_load_error = on_load_error
        self.engine = None
        self.aeng: AsyncEngine | None = None
        self.render_chat = None
        self.context = 0
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.loaded = threading.Event()
        self.lock = threading.Lock()
        self.closing = False
        self.status_counts: dict[tuple[str, int], int] = {}
        self.finish_counts: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def load_now(self) -> None:
        """Runs in a worker thread: load the engine, wrap it, find its chat template."""
        try:
            engine = self.load()
            render = getattr(engine, "apply_chat_template", None)
            if render is None and getattr(engine, "checkpoint_dir", None) is not None:
                try:
                    render = chat_template(engine.checkpoint_dir, engine.tokenizer)
                except Exception as exc:  # no usable tokenizer config: /v1/completions still works
                    logging.getLogger("shortrt.server").warning("no chat template: %s", exc)
            self.render_chat = render
            self.context = int(engine.max_seq)
            with self.lock:
                if self.closing:  # the server stopped while the model loaded
                    return
                self.engine = engine
                self.aeng = AsyncEngine(engine, max_queue=self.max_queue)
        except BaseException as exc:  # reported by /health and to whoever started the server
            self.load_error = exc
            if self.on_load_error is not None:
                self.on_load_error(exc)
        finally:
            self.loaded.set()

    def close(self) -> None:
        """Cancels what runs and stops the step loop; does not wait for a load in progress."""
        with self.lock:
            self.closing = True
            aeng = self.aeng
        if aeng is not None:
            aeng.shutdown()

    def count(self, endpoint: str, status: int) -> None:
        self.status_counts[endpoint, status] = self.status_counts.get((endpoint, status), 0) + 1

    def finished(self, req) -> None:
        reason = req.finish or "cancelled"
        self.finish_counts[reason] = self.finish_counts.get(reason, 0) + 1
        self.prompt_tokens += req.prompt_tokens
        self.completion_tokens += len(req.tokens)


def create_app(load, *, model_name: str, aliases=(), max_queue: int = 64, on_load_error=None) -> FastAPI:
    """The FastAPI app. load() -> an Engine (or anything with its submit/step/cancel/stats,
    max_seq and tokenizer) runs in a thread at startup; until it returns, /health is 503.
    model_name is what /v1/models lists; requests may name it or one of `aliases`."""
    state = ServerState(load, model_name, aliases, max_queue, on_load_error)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load_now, name="shortrt-load", daemon=True).start()
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="shortrt", lifespan=lifespan)
    app.state.shortrt = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if state.aeng is not None:
            return {"status": "ok"}
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "shortrt"}
        if state.context:
            card["max_model_len"] = state.context
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(state, request, chat=True)

    return app


# ----------------------------------------------------------------------------- completions

async def _read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _invalid(None, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid(None, "the request body must be a JSON object", "invalid_json")
    return body


def _prompt_ids(state: ServerState, body: dict, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if messages is None:
            raise _invalid("messages", "`messages` is required", "missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages", "`messages` must be a non-empty list of {role, content} objects",
                           "invalid_type")
        messages = [_message_text(m, i) for i, m in enumerate(messages)]
        if state.render_chat is None:
            raise _invalid("messages", f"the model {state.model_name!r} has no chat template: use /v1/completions",
                           "no_chat_template")
        try:
            return list(state.render_chat(messages))
        except Exception as exc:  # the template itself refused (e.g. roles out of order)
            raise _invalid("messages", f"the chat template refused the messages: {exc}") from None
    prompt = body.get("prompt")
    if prompt is None:
        raise _invalid("prompt", "`prompt` is required", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = state.engine.tokenizer.encode(prompt).ids
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = int(state.engine.config.get("vocab_size", 2**31)) if hasattr(state.engine, "config") else 2**31
        if any(not 0 <= t < vocab for t in prompt):
            raise _invalid("prompt", f"token ids in `prompt` must be in [0, {vocab})")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _invalid("prompt", "one prompt per request: this server does not take a batch of prompts",
                       "unsupported_value")
    else:
        raise _invalid("prompt", "`prompt` must be a string or a list of token ids", "invalid_type")
    if not ids:
        raise _invalid("prompt", "the prompt is empty (it encodes to no tokens)")
    return ids


async def _handle(state: ServerState, request: Request, chat: bool):
    endpoint = "chat" if chat else "completions"
    try:
        if state.aeng is None:
            why = f"failed to load: {state.load_error}" if state.load_error else "is still loading"
            raise APIError(503, f"the model {why}", code="model_not_ready", type="server_error")
        body = await _read_body(request)
        model = body.get("model")
        if model is not None and model not in state.names:
            raise _invalid("model", f"the model {json.dumps(model)} is not served here (this server runs "
                                    f"{state.model_name!r})", "model_not_found")
        options = _sampling(body)
        ids = _prompt_ids(state, body, chat)
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = _max_tokens(body, name, len(ids), state.context, None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS,
                              "messages" if chat else "prompt")
        try:
            req = await state.aeng.submit(ids, max_new_tokens=max_new, temperature=options["temperature"],
                                          top_k=options["top_k"], top_p=options["top_p"], seed=options["seed"],
                                          stop=[] if options["ignore_eos"] else None,
                                          stop_strings=options["stop_strings"])
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", type="rate_limit_error") from None
        except EngineClosed as exc:
            raise APIError(503, str(exc), code="shutting_down", type="server_error") from None
        except ValueError as exc:  # the engine's own check, naming its argument
            text = str(exc)
            param = next((api for arg, api in ENGINE_PARAMS.items() if arg in text), None)
            raise _invalid(param, text) from None
    except APIError as exc:
        state.count(endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)
    state.count(endpoint, 200)
    reply = _Reply(state, chat, options["include_usage"])
    if options["stream"]:
        return StreamingResponse(_stream(state, req, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(state, request, req, reply)


class _Reply:
    """The JSON shapes of one response (completion or chat, whole or in chunks)."""

    def __init__(self, state: ServerState, chat: bool, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = state.model_name

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(req) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": len(req.tokens),
                "total_tokens": req.prompt_tokens + len(req.tokens)}

    def whole(self, req, text: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": req.finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(req)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(req)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            data = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return _sse(data)

    def usage_chunk(self, req) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(obj), "choices": [], "usage": self.usage(req)})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, req, reply: _Reply):
    try:
        if reply.chat:
            yield reply.chunk(None, role=True)
        async for out in req:
            if out.text:
                yield reply.chunk(out.text)
            if out.finish is not None:
                yield reply.chunk(None, finish=out.finish)
        if reply.include_usage:
            yield reply.usage_chunk(req)
    except ShortrtError as exc:  # the engine failed or the server is shutting down mid-stream
        yield _sse(APIError(500, str(exc), code="generation_failed", type="server_error").body())
    finally:
        if req.finish is None:  # the client went away (the task was cancelled): free the KV region now
            req.cancel()
        state.finished(req)
    yield "data: [DONE]\n\n"


async def _complete(state: ServerState, request: Request, req, reply: _Reply):
    collect = asyncio.ensure_future(req.result())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client hung up before the answer was ready
            collect.cancel()
            req.cancel()
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        try:
            _, text, _ = collect.result()
        except ShortrtError as exc:
            err = APIError(500, str(exc), code="generation_failed", type="server_error")
            return JSONResponse(err.body(), status_code=500)
        return JSONResponse(reply.whole(req, text))
    finally:
        gone.cancel()
        state.finished(req)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- /metrics

def _metrics_text(state: ServerState) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    metric("shortrt_requests_total", "counter", "Completion requests answered, by endpoint and HTTP status.",
           [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(state.status_counts.items())])
    metric("shortrt_requests_finished_total", "counter",
           "Accepted requests that ended, by finish reason (cancelled = the client went away).",
           [({"reason": r}, n) for r, n in sorted(state.finish_counts.items())])
    metric("shortrt_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
           [({}, state.prompt_tokens)])
    metric("shortrt_completion_tokens_total", "counter", "Output tokens of finished requests.",
           [({}, state.completion_tokens)])
    metric("shortrt_model_loaded", "gauge", "1 once the model is loaded.", [({}, int(state.aeng is not None))])
    if state.aeng is not None:
        s = state.aeng.stats()
        metric("shortrt_tokens_generated_total", "counter", "Tokens the engine generated.",
               [({}, s.get("tokens_generated", 0))])
        metric("shortrt_engine_requests_finished_total", "counter", "Requests the engine finished.",
               [({}, s.get("requests_finished", 0))])
        metric("shortrt_sequences_running", "gauge", "Sequences decoding (holding a KV region).",
               [({}, s.get("running", 0))])
        metric("shortrt_sequences_queued", "gauge", "Requests waiting for a KV region.", [({}, s["waiting"])])
        metric("shortrt_kv_regions_used", "gauge", "KV-cache regions in use.", [({}, s.get("kv_regions_used", 0))])
        metric("shortrt_kv_regions", "gauge", "KV-cache regions (max_batch).",
               [({}, s.get("max_batch", state.aeng.max_batch))])
        metric("shortrt_kv_bytes_used", "gauge", "Bytes of KV cache in the regions in use.",
               [({}, s.get("kv_bytes_used", 0))])
        metric("shortrt_kv_bytes", "gauge", "Bytes of KV cache allocated.", [({}, s.get("kv_bytes", 0))])
    return "\n".join(lines) + "\n"
