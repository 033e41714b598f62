"""Running llama.cpp's own binaries on GGUF files: the one runner the benchmarks and the tests share.

$SHORTRT_LLAMA_CPP_BIN names a directory holding llama-server, llama-perplexity and llama-quantize;
the binaries find their shared libraries beside them (LD_LIBRARY_PATH is set to that directory).
Tests that need them skip when they are absent (skip_reason says why).

  server(gguf, ...)        a llama-server; yields greedy(ids, n), greedy.completion, greedy.tokenize
  perplexity(gguf, text)   llama-perplexity's final estimate; perplexity_run() more
  quantize(src, dst, type) llama-quantize (Q4_1, Q4_K_M, ...)
  version()                the build's version line
  protocol_perplexity      llama-perplexity's number computed from another engine's logits
  LlamaCppError            a binary that failed: why ("killed by SIGSEGV", "exit code 1"), its output
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BIN_ENV = "SHORTRT_LLAMA_CPP_BIN"
OUTPUT_TAIL_CHARS = 3000


class LlamaCppError(RuntimeError):
    """A llama.cpp binary that crashed, exited non-zero or printed no result."""

    def __init__(self, what: str, why: str, returncode: int | None, output: str):
        self.why, self.returncode, self.tail = f"{what} {why}", returncode, (output or "")[-OUTPUT_TAIL_CHARS:]
        super().__init__(f"{self.why}:\n{self.tail}")


def exit_reason(returncode: int) -> str:
    """'killed by SIGSEGV' for a negative return code, 'exit code N' otherwise."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def binary(name: str) -> Path | None:
    d = os.environ.get(BIN_ENV)
    if not d:
        return None
    p = Path(d) / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def skip_reason(name: str) -> str:
    return (f"{name} not found: set {BIN_ENV} to a llama.cpp build's bin directory "
            f"(now {os.environ.get(BIN_ENV)!r})")


def version(name: str = "llama-perplexity") -> str | None:
    """The build's `--version` line ("version: ... (build N, commit abc1234)"), or None."""
    exe = binary(name)
    if exe is None:
        return None
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=_env(exe), timeout=60)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version:")]
    return lines[0] if lines else None


def _require(name: str) -> Path:
    exe = binary(name)
    if exe is None:
        raise FileNotFoundError(skip_reason(name))
    return exe


def _env(p: Path) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{p.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(gguf: Path, *, ctx: int = 512, kv_type: str = "f32", threads: int = 2):
    """A llama-server on `gguf` with its KV cache in `kv_type`; yields greedy(ids, n) -> continuation
    token ids (the prompt passed as token ids: llama.cpp does not tokenize it), with
    greedy.completion(ids, n) -> the server's whole answer (tokens, timings),
    greedy.logprobs(ids, n, top) -> (tokens, each position's top log-probabilities) and
    greedy.tokenize(text) -> llama.cpp's token ids of text. A server that exits raises LlamaCppError."""
    exe = _require("llama-server")
    port = _free_port()
    log_path = Path(gguf).with_suffix(".server.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
                             "-t", str(threads), "-np", "1", "-ctk", kv_type, "-ctv", kv_type, "--no-warmup"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(exe))

    def died() -> LlamaCppError:
        log.flush()
        return LlamaCppError("llama-server", exit_reason(proc.returncode), proc.returncode,
                             log_path.read_text(errors="replace"))

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise died()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.time() > deadline:
                raise LlamaCppError("llama-server", "did not become ready in 120 s", None,
                                    log_path.read_text(errors="replace"))
            time.sleep(0.3)

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    return json.loads(r.read())
            except OSError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                if proc.poll() is not None:
                    raise died() from None
                raise

        def completion(ids: list[int], n: int) -> dict:
            body = {"prompt": list(ids), "n_predict": n, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                    "return_tokens": True, "cache_prompt": False, "ignore_eos": True}
            return post("/completion", body)

        def greedy(ids: list[int], n: int) -> list[int]:
            return list(completion(ids, n)["tokens"])

        def logprobs(ids: list[int], n: int, token_bytes, top: int = 8):
            """Greedy continuation and, at each of its n positions, the `top` most likely next tokens'
            log-probabilities {token id: logprob} (the server's softmax of the raw logits, no sampler), or
            None at a position the server reports nothing for: it holds back a token that leaves its text
            ending inside a UTF-8 character (server-context.cpp, validate_utf8), which random byte-level
            models emit often. token_bytes(id) -> the token's bytes (b"" for control tokens) finds those."""
            body = {"prompt": list(ids), "n_predict": n, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                    "return_tokens": True, "cache_prompt": False, "ignore_eos": True, "n_probs": top,
                    "post_sampling_probs": False}
            out = post("/completion", body)
            tokens, reported = list(out["tokens"]), list(out.get("completion_probabilities", []))
            text, steps = b"", []
            for t in tokens:
                text += token_bytes(t)
                steps.append(None if cut_utf8(text) else "next")
            if sum(s is not None for s in steps) != len(reported):
                raise LlamaCppError("llama-server", f"reported {len(reported)} log-probabilities for {n} tokens, "
                                    f"{sum(s is not None for s in steps)} expected", None, json.dumps(out)[:2000])
            it = iter(reported)
            for k, s in enumerate(steps):
                if s is not None:
                    entry = next(it)
                    if int(entry["id"]) != tokens[k]:
                        raise LlamaCppError("llama-server", f"log-probabilities of token {entry['id']} reported at "
                                            f"position {k} (token {tokens[k]})", None, json.dumps(out)[:2000])
                    steps[k] = {int(e["id"]): float(e["logprob"]) for e in entry["top_logprobs"]}
            return tokens, steps

        def tokenize(text: str) -> list[int]:
            return list(post("/tokenize", {"content": text, "add_special": False})["tokens"])

        greedy.completion = completion
        greedy.logprobs = logprobs
        greedy.tokenize = tokenize
        yield greedy
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
        log.close()


def cut_utf8(text: bytes) -> bool:
    """Whether `text` ends inside a multi-byte UTF-8 character, as llama-server's validate_utf8 sees
    it (a lead byte among the last 4 bytes with fewer bytes after it than its sequence needs)."""
    for i in range(1, min(4, len(text)) + 1):
        c = text[-i]
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 0
        if need and i < need:
            return True
    return False


def perplexity_run(gguf: Path, text_file: Path, *, ctx: int = 512, chunks: int | None = None, threads: int = 2,
                   kv_type: str = "f32", attempts: int = 3) -> dict:
    """llama-perplexity's estimate over the first `chunks` windows of `text_file` (windows of `ctx`
    tokens back to back, the second half of each scored, KV cache in kv_type): {"ppl",
    "window_tok_s": ctx / its first window's seconds, "attempts"}. Raises LlamaCppError when it
    crashes or prints no estimate.

    llama.cpp logs from a thread of its own that nothing joins at exit (common_log_main's log is
    never destroyed), so a process that exits 0 often loses its last lines, the final estimate
    among them. With `chunks` given it is therefore asked for one window more than that (the text
    must hold it) and the estimate is its running value after window `chunks` ("[N]ppl,": the same
    number the final estimate of `chunks` windows prints, each window being scored alone), logged
    while it still computes; a run whose value was lost anyway is repeated, up to `attempts` times."""
    exe = _require("llama-perplexity")
    cmd = [str(exe), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads), "-b", str(ctx),
           "-ctk", kv_type, "-ctv", kv_type]
    if chunks:
        cmd += ["--chunks", str(chunks + 1)]
    for attempt in range(1, attempts + 1):
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(exe), timeout=3600)
        text = out.stdout + out.stderr
        if out.returncode != 0:
            raise LlamaCppError("llama-perplexity", exit_reason(out.returncode), out.returncode, text)
        n = re.search(r"calculating perplexity over (\d+) chunks", text)
        if chunks and n and int(n.group(1)) <= chunks:
            raise LlamaCppError("llama-perplexity", f"found only {n.group(1)} windows of {ctx} tokens in "
                                f"{text_file} ({chunks} + 1 needed)", out.returncode, text)
        if chunks:
            m = re.search(rf"\[{chunks}\]([0-9.]+),", out.stdout)
        else:
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
        if m:
            speed = re.search(r"([0-9.]+) seconds per pass", text)
            return {"ppl": float(m.group(1)), "attempts": attempt,
                    "window_tok_s": ctx / float(speed.group(1)) if speed and float(speed.group(1)) > 0 else None}
    raise LlamaCppError("llama-perplexity", f"printed no estimate in {attempts} runs", out.returncode, text)


def perplexity(gguf: Path, text_file: Path, *, ctx: int = 512, chunks: int | None = None, threads: int = 2,
               kv_type: str = "f32") -> float:
    """llama-perplexity's final estimate on `text_file` (see perplexity_run)."""
    return perplexity_run(gguf, text_file, ctx=ctx, chunks=chunks, threads=threads, kv_type=kv_type)["ppl"]


def quantize(src: Path, dst: Path, qtype: str, *, threads: int = 2) -> Path:
    """llama-quantize `src` (an F32/F16 GGUF) to `qtype` (Q4_1, Q4_K_M, ...) at dst, written beside
    it under a temporary name and renamed when complete."""
    exe = _require("llama-quantize")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    out = subprocess.run([str(exe), str(src), str(tmp), qtype, str(threads)], capture_output=True, text=True,
                         env=_env(exe), timeout=3600)
    if out.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlamaCppError(f"llama-quantize to {qtype}", exit_reason(out.returncode), out.returncode,
                            out.stdout + out.stderr)
    tmp.replace(dst)
    return dst


def protocol_perplexity(logits_of, ids: list[int], ctx: int, chunks: int, bos_id: int | None = None) -> float:
    """llama-perplexity's estimate computed from another engine: `chunks` windows of `ctx` tokens of
    `ids`, back to back from the first (each window's first token replaced by bos_id when the model
    adds a BOS, as llama-perplexity does), each scoring its tokens ctx/2+1 .. ctx-1 from the logits
    at the positions before them. logits_of(window ids) -> [len(window), vocab] array."""
    import numpy as np

    if len(ids) < ctx * chunks:
        raise ValueError(f"{chunks} windows of {ctx} tokens need {ctx * chunks} tokens, got {len(ids)}")
    first, nll, count = ctx // 2, 0.0, 0
    for c in range(chunks):
        window = list(ids[c * ctx:(c + 1) * ctx])
        if bos_id is not None:
            window[0] = bos_id
        z = np.asarray(logits_of(window), dtype=np.float64)[first:ctx - 1]
        top = z.max(axis=1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        targets = np.asarray(window[first + 1:ctx])
        nll += float((lse - z[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(nll / count)
