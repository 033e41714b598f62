"""Running llama.cpp's own binaries on exported GGUF files (tests that skip when they are absent).

$SHORTRT_LLAMA_CPP_BIN names a directory holding llama-server (and llama-perplexity); the
binaries find their shared libraries beside them (LD_LIBRARY_PATH is set to that directory).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BIN_ENV = "SHORTRT_LLAMA_CPP_BIN"


def binary(name: str) -> Path | None:
    d = os.environ.get(BIN_ENV)
    if not d:
        return None
    p = Path(d) / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def skip_reason(name: str) -> str:
    return (f"{name} not found: set {BIN_ENV} to a llama.cpp build's bin directory "
            f"(now {os.environ.get(BIN_ENV)!r})")


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
    """A llama-server on `gguf`; yields greedy(ids, n) -> continuation token ids, with
    greedy.tokenize(text) -> llama.cpp's token ids of text."""
    exe = binary("llama-server")
    port = _free_port()
    log = open(Path(gguf).with_suffix(".server.log"), "wb")
    proc = subprocess.Popen([str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
                             "-t", str(threads), "-np", "1", "-ctk", kv_type, "-ctv", kv_type, "--no-warmup"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(exe))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"llama-server exited {proc.returncode} on {gguf}:\n"
                                   + Path(log.name).read_text(errors="replace")[-3000:])
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.time() > deadline:
                raise RuntimeError(f"llama-server did not become ready on {gguf}")
            time.sleep(0.3)

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())

        def greedy(ids: list[int], n: int) -> list[int]:
            body = {"prompt": list(ids), "n_predict": n, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                    "return_tokens": True, "cache_prompt": False, "ignore_eos": True}
            return list(post("/completion", body)["tokens"])

        def tokenize(text: str) -> list[int]:
            return list(post("/tokenize", {"content": text, "add_special": False})["tokens"])

        greedy.tokenize = tokenize
        yield greedy
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
        log.close()


def perplexity(gguf: Path, text_file: Path, *, ctx: int = 512, chunks: int | None = None, threads: int = 2) -> float:
    """llama-perplexity's final estimate on `text_file` (windows of `ctx` tokens, second half scored)."""
    exe = binary("llama-perplexity")
    cmd = [str(exe), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads), "-b", str(ctx),
           "-ctk", "f32", "-ctv", "f32"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(exe), timeout=3600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed on {gguf}:\n{(out.stdout + out.stderr)[-3000:]}")
    return float(m.group(1))
