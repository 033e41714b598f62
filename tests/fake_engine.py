"""A stand-in for shortrt.Engine's request API (submit/step/cancel/stats) for unit tests of the
async wrapper and the HTTP layer: deterministic tokens, a fixed step time, faults on demand.
End-to-end tests (outputs, load, KV regions) use the real engine, never this."""
from __future__ import annotations

import threading
import time
from collections import deque


class FakeEngine:
    """Token i of a request is a function of its prompt and i; eos (2) only when `eos_at` says."""

    def __init__(self, tokenizer=None, max_batch: int = 2, max_seq: int = 64, step_s: float = 0.002,
                 eos_at: int | None = None):
        self.tokenizer, self.max_batch, self.max_seq, self.step_s, self.eos_at = \
            tokenizer, max_batch, max_seq, step_s, eos_at
        self.config = {"vocab_size": 300}
        self.fail_next_step: Exception | None = None
        self.steps = 0
        self._lock = threading.Lock()
        self._next_id = 0
        self._queue: deque = deque()
        self._running: dict[int, dict] = {}
        self._reports: list = []  # cancel events for the next step
        self._generated = self._finished = 0

    @staticmethod
    def token(prompt: list[int], i: int, seed: int = 0) -> int:
        return 3 + (sum(prompt) * 7 + i * 13 + seed) % 250

    def submit(self, prompt_ids, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=None):
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt_ids) + max_new_tokens > self.max_seq:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"context of {self.max_seq}")
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._queue.append({"id": rid, "prompt": list(prompt_ids), "n": max_new_tokens, "seed": seed,
                                "stop": [2] if stop is None else list(stop), "i": 0})
        return rid

    def cancel(self, rid) -> None:
        with self._lock:
            req = self._running.pop(rid, None)
            if req is None:
                req = next((r for r in self._queue if r["id"] == rid), None)
                if req is not None:
                    self._queue.remove(req)
            if req is not None:
                self._reports.append((rid, -1, "cancelled"))
                self._finished += 1

    def step(self):
        with self._lock:
            if self.fail_next_step is not None:
                exc, self.fail_next_step = self.fail_next_step, None
                raise exc
            while self._queue and len(self._running) < self.max_batch:
                req = self._queue.popleft()
                self._running[req["id"]] = req
            events, self._reports = self._reports, []
            busy = bool(self._running)
        if busy:
            time.sleep(self.step_s)  # the forward pass (releases the GIL like the real one)
        with self._lock:
            self.steps += busy
            for rid, req in list(self._running.items()):
                tok = 2 if self.eos_at is not None and req["i"] == self.eos_at else self.token(req["prompt"], req["i"],
                                                                                           req["seed"])
                req["i"] += 1
                if tok in req["stop"]:
                    events.append((rid, -1, "stop"))
                elif req["i"] >= req["n"]:
                    events.append((rid, tok, "length"))
                else:
                    events.append((rid, tok, None))
                if events[-1][2] is not None:
                    del self._running[rid]
                    self._finished += 1
                if events[-1][1] >= 0:
                    self._generated += 1
        return events

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "queued": len(self._queue), "max_batch": self.max_batch,
                    "kv_regions_used": len(self._running), "kv_bytes": 1024 * self.max_batch,
                    "kv_bytes_used": 1024 * len(self._running), "tokens_generated": self._generated,
                    "requests_finished": self._finished}
