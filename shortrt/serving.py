"""AsyncEngine: the engine's request-level step loop in a background thread, for asyncio code.

    aeng = AsyncEngine(Engine(ckpt, max_batch=8), max_queue=32)
    req = await aeng.submit(prompt_ids, max_new_tokens=64, stop_strings=["\\n\\n"])
    async for out in req:                  # Output(token, text, finish), in order
        print(out.text, end="")
    aeng.shutdown()

One thread owns the engine: it submits new requests, runs `engine.step()` (one forward pass
over every running sequence, GIL released) and hands each step's events to the event loop
that asked for them, one `call_soon_threadsafe` per loop per step. It sleeps on a condition
while nothing is running. Only `engine.cancel` (thread-safe by contract) is called from
other threads. The HTTP server (shortrt/server.py) is a thin layer over this module; nothing
here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .engine import Detokenizer  # text pieces exactly as Engine.stream makes them
from .errors import ShortrtError


class QueueFull(ShortrtError):
    """Every KV region is in use and max_queue requests are already waiting."""


class EngineClosed(ShortrtError):
    """The AsyncEngine was shut down (before or while the request ran)."""


class RequestFailed(ShortrtError):
    """The engine raised while running the request."""


@dataclass(frozen=True)
class Output:
    """One step of a request: the new token (-1 when the step only ended the request), the
    text it completed (may be "" while a multi-byte character or a possible stop string is
    held back), and the finish reason: None while running, else "stop", "length", "cancelled"."""
    token: int
    text: str
    finish: str | None


class _StopStrings:
    """Text released so far, cut at the first stop string. A tail that could be the start of
    a stop string is held back until the next piece shows whether it is one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # chars of self.text released; no stop string can start before this

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """(text to release now, whether a stop string was reached)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            held = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                        if self.text.endswith(s[:k])), default=0)
            end, stopped = len(self.text) - held, False
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, stopped


class Request:
    """One submitted request: iterate it (`async for out in req`) for its Outputs in order.

    Leaving the iteration early (break, an exception, the task being cancelled) cancels the
    request in the engine, which frees its KV region at once. `prompt_tokens` is the prompt's
    length, `tokens` the output tokens delivered so far, `finish` the reason once it ended."""

    def __init__(self, aeng: AsyncEngine, loop, prompt_ids: list[int], options: dict, stop_strings):
        self._aeng = aeng
        self._loop = loop
        self.prompt_ids = prompt_ids
        self.options = options
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.id: int | None = None  # the engine's request id, once submitted
        self._queue: asyncio.Queue = asyncio.Queue()
        self._accepted = loop.create_future()
        # Owned by the step thread:
        self._detok = Detokenizer(aeng.tokenizer) if aeng.tokenizer is not None else None
        self._stops = _StopStrings(stop_strings)
        self._ended = False  # the consumer has been given its last item
        self._cancel_asked = False  # guarded by AsyncEngine._lock

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            while self.finish is None:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finish = "error"
                    raise item
                if item.token >= 0:
                    self.tokens.append(item.token)
                if item.finish is not None:
                    self.finish = item.finish
                yield item
        finally:
            if self.finish is None:
                self.cancel()

    async def result(self) -> tuple[list[int], str, str]:
        """Runs the request to its end: (output tokens, text, finish reason)."""
        pieces = [out.text async for out in self]
        return self.tokens, "".join(pieces), self.finish

    def cancel(self) -> None:
        """Stops the request and frees its KV region (from the event loop's thread)."""
        self._aeng._cancel(self)

    # --- step-thread side -------------------------------------------------
    def _on_event(self, token: int, finish: str | None) -> Output | None:
        """The Output to hand to the consumer for one engine event (None: nothing to say)."""
        if self._ended:
            return None
        piece = ""
        if token >= 0 and self._detok is not None:
            piece = self._detok.push(token)
        if finish is not None and self._detok is not None:
            piece += self._detok.flush()
        text, stopped = self._stops.feed(piece, final=finish is not None)
        if stopped:
            finish = "stop"
        if finish is not None:
            self._ended = True
        return Output(token, text, finish)


class AsyncEngine:
    """An engine with a submit/step/cancel/stats request API, run by one background thread.

    max_queue: requests that may wait for a KV region when all max_batch regions are busy;
    one more raises QueueFull. tokenizer: a `tokenizers.Tokenizer` for the text pieces and
    stop strings (default: the engine's, when it has one)."""

    def __init__(self, engine, max_queue: int = 64, tokenizer=None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = int(getattr(engine, "max_batch", None) or engine.stats()["max_batch"])
        if tokenizer is None:
            try:
                tokenizer = engine.tokenizer
            except (AttributeError, ShortrtError):
                tokenizer = None  # token ids only
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[Request] = []  # accepted, not yet handed to the engine
        self._running: dict[int, Request] = {}  # engine id -> request, until the engine ends it
        self._closed = False
        self._stats = dict(engine.stats())  # the last snapshot, taken by the step thread
        self.requests_failed = 0
        self._thread = threading.Thread(target=self._loop, name="shortrt-step", daemon=True)
        self._thread.start()

    # --- event-loop side ----------------------------------------------------
    async def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[int] | None = None,
                     stop_strings: Sequence[str] = ()) -> Request:
        """Queues a request and waits until the engine has accepted it (its next step).

        stop: token ids that end it (None = the model's eos ids); stop_strings: text that ends
        it, cut from the output. Raises QueueFull, EngineClosed, or the engine's ValueError
        for a bad argument (e.g. a prompt past the context)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, stop=None if stop is None else list(stop))
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        req = Request(self, asyncio.get_running_loop(), [int(t) for t in prompt_ids], options, list(stop_strings))
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            waiting = len(self._pending) + len(self._running) - self.max_batch
            if waiting >= self.max_queue:
                raise QueueFull(f"the server is at capacity: {self.max_batch} requests running and "
                                f"{self.max_queue} waiting (max_queue); retry later")
            self._pending.append(req)
            self._wake.notify()
        try:
            await req._accepted
        except asyncio.CancelledError:
            req.cancel()
            raise
        return req

    def stats(self) -> dict:
        """The engine's stats() after its latest step, with `pending` (accepted here, not yet
        in the engine) and `waiting` (pending + the engine's queue)."""
        with self._lock:
            out = dict(self._stats)
            out["pending"] = len(self._pending)
        out["waiting"] = out["pending"] + out.get("queued", 0)
        out["requests_failed"] = self.requests_failed
        return out

    def _cancel(self, req: Request) -> None:
        with self._lock:
            if req._cancel_asked or req.finish is not None:
                return
            req._cancel_asked = True
            engine_id = req.id
            if req in self._pending:  # never reached the engine: it ends here
                self._pending.remove(req)
                req._ended = True
                req._queue.put_nowait(Output(-1, "", "cancelled"))
                if not req._accepted.done():
                    req._accepted.set_result(None)
                return
        if engine_id is not None:
            self.engine.cancel(engine_id)  # frees the region now; the next step reports it

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancels every request in flight (their consumers get EngineClosed) and joins the
        step thread (it finishes the step it is in). Idempotent; callable from any thread."""
        with self._lock:
            self._closed = True
            victims = self._pending + list(self._running.values())
            self._pending, self._running = [], {}
            self._wake.notify()
        for req in victims:
            if req.id is not None:
                self.engine.cancel(req.id)
        self._deliver([(req, EngineClosed("the server shut down before the request finished"))
                       for req in victims])
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- step thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._pending and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
                new, self._pending = self._pending, []
            out = [self._start(req) for req in new]
            try:
                events = self.engine.step()
            except Exception as exc:  # the engine failed: every running request ends with the error
                self._fail_running(exc)
                continue
            out += self._dispatch(events)
            stats = self.engine.stats()
            with self._lock:
                self._stats = stats
                lost = []
                if not events and self._running and not (stats.get("running") or stats.get("queued")):
                    # The engine holds none of them (a cancel it has not reported yet, or a bug):
                    # never leave a consumer waiting for an event that will not come.
                    lost = [r for r in self._running.values() if not r._cancel_asked]
                    self._running = {}
            out += [(req, RequestFailed("the engine dropped the request")) for req in lost]
            self._deliver([item for item in out if item is not None])

    def _start(self, req: Request):
        try:
            engine_id = self.engine.submit(req.prompt_ids, **req.options)
        except Exception as exc:  # the engine's validation (ValueError naming the argument)
            return req, ("rejected", exc)
        with self._lock:
            req.id = engine_id
            self._running[engine_id] = req
            cancelled = req._cancel_asked or self._closed
        if cancelled:
            self.engine.cancel(engine_id)
        return req, ("accepted", None)

    def _dispatch(self, events) -> list:
        out = []
        for engine_id, token, finish in events:
            with self._lock:
                req = self._running.get(engine_id)
                if req is not None and finish is not None:
                    del self._running[engine_id]  # its region is free again
            if req is None:
                continue
            item = req._on_event(token, finish)
            if item is not None:
                out.append((req, item))
                if item.finish == "stop" and finish is None:  # a stop string: the engine still runs it
                    with self._lock:
                        req._cancel_asked = True
                    self.engine.cancel(engine_id)
        return out

    def _fail_running(self, exc: Exception) -> None:
        with self._lock:
            victims = list(self._running.values())
            self._running = {}
        self.requests_failed += len(victims)
        for req in victims:
            try:
                self.engine.cancel(req.id)
            except Exception:
                pass
        self._deliver([(req, RequestFailed(f"the engine failed: {exc}")) for req in victims])

    def _deliver(self, items) -> None:
        """Hands (request, Output | exception | ("accepted"/"rejected", exc)) to each request's
        event loop: one call per loop, in order."""
        by_loop: dict = {}
        for req, item in items:
            by_loop.setdefault(req._loop, []).append((req, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_apply, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for req, _ in batch:
                    if req.id is not None:
                        self.engine.cancel(req.id)


def _apply(batch) -> None:
    """Runs on the request's event loop: resolves acceptance and queues outputs."""
    for req, item in batch:
        if isinstance(item, tuple):
            kind, exc = item
            if not req._accepted.done():
                req._accepted.set_exception(exc) if kind == "rejected" else req._accepted.set_result(None)
            continue
        if not req._accepted.done():  # failed or closed before the engine accepted it
            req._accepted.set_exception(item if isinstance(item, BaseException) else RequestFailed(str(item)))
            continue
        req._queue.put_nowait(item)


def chat_template(checkpoint_dir: str | Path, tokenizer):
    """messages -> prompt ids with the checkpoint's chat template, or None when it has none.

    transformers renders the template (with its own globals, e.g. raise_exception); the text
    is encoded by `tokenizer` without adding special tokens again, as Engine.encode(chat=True)
    does for a single user message."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    if not getattr(hf, "chat_template", None):
        return None

    def render(messages: list[dict]) -> list[int]:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False).ids

    return render
