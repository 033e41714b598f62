"""The runtime under stress: interpreter exit with generation in flight, re-entrant and
concurrent calls, a refused worker thread, Ctrl-C, sampling parameters that cannot be
computed, and no heap allocation per decoded token.

Whatever could abort or hang runs in a subprocess with a timeout, so a regression fails
instead of taking the test run with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shortrt
from runtime_models import make_tiny, save_tiny_tokenizer
from shortrt import _C
from shortrt.engine import Engine

REPO = Path(shortrt.__file__).resolve().parent.parent


def write_llama(path: Path, hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=2, vocab=300,
                max_position=4096) -> Path:
    """A random Llama checkpoint written straight from numpy (no torch): big enough that a
    long generation takes seconds (about 1.5 ms a token on one core), with a tokenizer."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hd = hidden // heads

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.05

    t = {"model.embed_tokens.weight": w(vocab, hidden) * 20, "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=max_position, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0)
    (path / "config.json").write_text(json.dumps(config))
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("robust") / "slow")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("robust") / "tiny", tokenizer=True)[0]


def python_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.pop("SHORTRT_TEST_FAIL_THREAD", None)
    env.update(extra)
    return env


def run_script(code: str, *args, timeout: float, **env) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; a hang past `timeout` fails the test."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=python_env(**env),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {timeout} s; stdout={exc.stdout!r} stderr={exc.stderr!r}")


# ---- 1. interpreter exit while another thread generates ----------------------

EXIT_SCRIPT = """
import sys, threading, time
from shortrt.engine import Engine

eng = Engine(sys.argv[1], threads=2, max_seq=2048)
mode = sys.argv[2]
started = threading.Event()
count = [0]

def on_token(seq, token):
    started.set()
    count[0] += 1
    if mode == "stuck_callback" and count[0] == 3:
        while True:               # never returns; keeps asking for the GIL
            time.sleep(0.0002)

def run():
    if mode in ("callback", "stuck_callback"):
        eng.generate_ids([1, 2, 3], max_new_tokens=1500, stop=[], callback=on_token)
    elif mode == "plain":
        started.set()
        eng.generate_ids([1, 2, 3], max_new_tokens=1500, stop=[])
    elif mode == "stream":
        for piece in eng.stream("Once upon", max_new_tokens=1500, stop=[]):
            started.set()
    elif mode == "raw_callback":    # the binding without the Python wrapper
        eng._engine.generate([[1, 2, 3]], 1500, 0.0, 0, 1.0, 0, [], on_token)

threading.Thread(target=run, daemon=True).start()
assert started.wait(30)
time.sleep(0.2)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("mode", ["callback", "plain", "stream", "raw_callback", "stuck_callback"])
def test_exit_with_generation_in_flight_in_a_daemon_thread(slow_model, mode):
    """Used to abort with "terminate called without an active exception" (callback, stream)."""
    start = time.monotonic()
    r = run_script(EXIT_SCRIPT, slow_model, mode, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "exiting" in r.stdout
    assert "terminate" not in r.stderr and "Fatal Python error" not in r.stderr, r.stderr[-2000:]
    # A cancelled call returns within a token; a stuck callback is given up on after 3 s.
    assert elapsed < (20 if mode == "stuck_callback" else 15)


def test_calls_after_exit_began_raise(tiny):
    """Once the atexit hook of shortrt._C has run, a call raises instead of computing.
    (atexit runs hooks last-registered first.)"""
    code = """
    import atexit, sys
    from shortrt.engine import Engine

    def after_hook():
        try:
            eng.generate_ids([1, 2], max_new_tokens=3, stop=[])
            print("after: no error", flush=True)
        except RuntimeError as exc:
            print("after:", exc, flush=True)

    atexit.register(after_hook)  # before shortrt._C is imported: runs after its hook
    eng = Engine(sys.argv[1], threads=1, max_seq=64)
    atexit.register(lambda: print("before:", len(eng.generate_ids([1, 2], max_new_tokens=3, stop=[])), flush=True))
    """
    r = run_script(code, tiny, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "before: 3" in r.stdout
    assert "after: shortrt: the interpreter is exiting; this Engine no longer generates" in r.stdout


# ---- 2. re-entrant and concurrent calls ----------------------------------------

def test_callback_calling_its_own_engine_is_an_error(tiny):
    """Used to deadlock (the engine waited on its own lock)."""
    code = """
    import sys
    from shortrt.engine import Engine
    eng = Engine(sys.argv[1], threads=2, max_seq=64)
    for name, call in [("generate", lambda: eng.generate_ids([1, 2], max_new_tokens=2)),
                       ("logits", lambda: eng.logits([1, 2]))]:
        def on_token(seq, token):
            call()
        try:
            eng.generate_ids([1, 2, 3], max_new_tokens=5, stop=[], callback=on_token)
            print(name, "no error")
        except RuntimeError as exc:
            print(name, "RuntimeError:", exc)
    # The engine is still usable, and a stream consumer may call it (the calls take turns).
    pieces = []
    for piece in eng.stream("Once", max_new_tokens=4, stop=[]):
        pieces.append(eng.generate_ids([1, 2], max_new_tokens=2, stop=[]))
    print("after", len(eng.generate_ids([1, 2], max_new_tokens=4, stop=[])), len(pieces) > 0)
    """
    r = run_script(code, tiny, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("generate", "logits"):
        assert f"{name} RuntimeError: Engine.{name} called from inside this engine's own callback" in r.stdout
    assert "after 4 True" in r.stdout


def test_two_threads_share_one_engine(tiny):
    """Concurrent calls on one engine take turns and give what they give alone."""
    eng = Engine(tiny, threads=2, max_seq=64)
    prompts = [[1, 17, 250, 3], [1, 99, 42, 7], [5, 6], [7, 8, 9]]
    expected = [eng.generate_ids(p, max_new_tokens=20, temperature=0.8, seed=i, stop=[]) for i, p in enumerate(prompts)]
    results, errors = {}, []

    def worker(i):
        try:
            for _ in range(5):
                seen = []
                out = eng.generate_ids(prompts[i], max_new_tokens=20, temperature=0.8, seed=i, stop=[],
                                       callback=lambda seq, tok: seen.append(tok))
                assert out == seen
                results.setdefault(i, []).append(out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # Daemon threads: should they deadlock, the assertion below fails and pytest can still exit.
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i, outs in results.items():
        assert outs == [expected[i]] * 5


# ---- 3. a worker thread the OS refuses --------------------------------------------

def test_refused_worker_thread_is_a_clear_error(tiny):
    code = """
    import os, sys
    from shortrt import _C
    from shortrt.engine import Engine

    def n_threads():
        return len(os.listdir("/proc/self/task"))

    before = n_threads()
    for threads, k in [(4, 2), (2, 1), (8, 7)]:
        os.environ["SHORTRT_TEST_FAIL_THREAD"] = str(k)
        try:
            Engine(sys.argv[1], threads=threads, max_seq=64)
            print("no error")
        except RuntimeError as exc:
            print("RuntimeError:", exc)
    print("threads left", n_threads() - before)
    del os.environ["SHORTRT_TEST_FAIL_THREAD"]
    eng = Engine(sys.argv[1], threads=4, max_seq=64)
    print("then", eng.threads, len(eng.generate_ids([1, 2], max_new_tokens=3, stop=[])))
    """
    r = run_script(code, tiny, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("RuntimeError: could not start worker thread 2 of 3 for threads=4"), lines
    assert "Resource temporarily unavailable" in lines[0]
    assert lines[1].startswith("RuntimeError: could not start worker thread 1 of 1 for threads=2"), lines
    assert lines[2].startswith("RuntimeError: could not start worker thread 7 of 7 for threads=8"), lines
    assert "threads left 0" in r.stdout  # the workers that did start were joined
    assert "then 4 3" in r.stdout


# ---- 4. Ctrl-C ------------------------------------------------------------------------

INTERRUPT_SCRIPT = """
import sys, threading, time
from shortrt.engine import Engine

eng = Engine(sys.argv[1], threads=1, max_seq=4096)
mode = sys.argv[2]
reference = eng.generate_ids([1, 2, 3], max_new_tokens=8, stop=[])
if mode == "waiting":   # another thread holds the engine; the main thread waits for it
    threading.Thread(target=lambda: eng.generate_ids([4, 5], max_new_tokens=4000, stop=[]), daemon=True).start()
    time.sleep(0.2)
print("started", flush=True)
start = time.monotonic()
try:
    if mode == "logits":
        eng.logits(list(range(3, 283)) * 14, chunk=1)
    else:
        eng.generate_ids([1, 2, 3], max_new_tokens=4000, stop=[])
    print("finished uninterrupted after", time.monotonic() - start, flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
if mode != "waiting":
    print("still works", eng.generate_ids([1, 2, 3], max_new_tokens=8, stop=[]) == reference, flush=True)
"""


@pytest.mark.parametrize("mode", ["generate", "logits", "waiting"])
def test_ctrl_c_interrupts_within_milliseconds(slow_model, mode):
    """Ctrl-C used to wait for the whole generation (seconds here, minutes on a real model)."""
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_SCRIPT, str(slow_model), mode], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a hung child ends the blocking reads below
    watchdog.start()
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().strip()
        latency = time.monotonic() - sent
        out, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line == "interrupted", (line, err[-2000:])
    assert latency < 2.0, latency
    assert proc.returncode == 0, err[-2000:]
    if mode != "waiting":
        assert "still works True" in out


# ---- 5. sampling parameters ----------------------------------------------------------

@pytest.fixture(scope="module")
def eng(tiny):
    return Engine(tiny, threads=2, max_seq=64)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 5e-5, 9.9e-5])
def test_temperature_below_threshold_is_greedy(eng, temperature):
    """1 / 1e-40 overflows float: it used to sample from NaNs."""
    greedy = eng.generate_ids([1, 17, 250], max_new_tokens=12, stop=[])
    for seed in (0, 1, 2):
        assert eng.generate_ids([1, 17, 250], max_new_tokens=12, temperature=temperature, seed=seed,
                                stop=[]) == greedy
        assert eng._engine.generate([[1, 17, 250]], 12, temperature, 0, 1.0, seed, []) == [greedy]


def test_temperature_at_threshold_samples(eng):
    # At 1e-4 the logits are divided (no shortcut) and give a valid, seeded draw.
    a = eng.generate_ids([1, 17, 250], max_new_tokens=12, temperature=1e-4, seed=3, stop=[])
    assert a == eng.generate_ids([1, 17, 250], max_new_tokens=12, temperature=1e-4, seed=3, stop=[])
    assert all(0 <= t < 300 for t in a)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), r"temperature must be >= 0 and finite \(0 = greedy\), got nan"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_p=None), "top_p must be a number"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=99999999999), "max_new_tokens must be at most 2147483647, got 99999999999"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=2**64), "seed must be at most 18446744073709551615"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_sampling_arguments_name_the_argument(eng, kwargs, message):
    for call in (lambda: eng.generate_ids([1, 2, 3], **kwargs), lambda: list(eng.stream("Once", **kwargs)),
                 lambda: eng.generate("Once", **kwargs)):
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_binding_checks_arguments_too(eng):
    raw = eng._engine
    cases = [
        (dict(max_new_tokens=3_000_000_000), "max_new_tokens must be an integer in"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
        (dict(top_k=-2), "top_k must be an integer in"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            raw.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})


def test_integer_like_arguments_are_accepted(eng):
    base = eng.generate_ids([1, 2, 3], max_new_tokens=6, temperature=0.9, seed=5, stop=[])
    assert eng.generate_ids([1, 2, 3], max_new_tokens=np.int64(6), temperature=np.float32(0.9), seed=np.uint64(5),
                            stop=[]) == base
    # top_k beyond the vocabulary (or beyond int32) cuts nothing.
    assert eng.generate_ids([1, 2, 3], max_new_tokens=6, temperature=0.9, seed=5, top_k=10**12, stop=[]) == base
    assert eng.generate_ids([1, 2, 3], max_new_tokens=6, temperature=0.9, seed=2**64 - 1, stop=[]) == \
        eng._engine.generate([[1, 2, 3]], 6, 0.9, 0, 1.0, 2**64 - 1, [])[0]


# ---- 6. decode allocates nothing per token ----------------------------------------------

MALLOC_COUNTER = r"""
#define _GNU_SOURCE
#include <stddef.h>
extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
static volatile int counting;
static long count;
void counter_start(void) { __atomic_store_n(&count, 0, __ATOMIC_SEQ_CST); counting = 1; }
long counter_stop(void) { counting = 0; return __atomic_load_n(&count, __ATOMIC_SEQ_CST); }
static void note(void) { if (counting) __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED); }
void* malloc(size_t n) { note(); return __libc_malloc(n); }
void* calloc(size_t a, size_t b) { note(); return __libc_calloc(a, b); }
void* realloc(void* p, size_t n) { note(); return __libc_realloc(p, n); }
void* aligned_alloc(size_t a, size_t n) { note(); return __libc_memalign(a, n); }
int posix_memalign(void** p, size_t a, size_t n) { note(); *p = __libc_memalign(a, n); return *p ? 0 : 12; }
"""


def test_decode_allocates_nothing_per_token(tiny, tmp_path):
    """attention_decode used to allocate three vectors per layer and token."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and glibc to count malloc calls")
    src = tmp_path / "count.c"
    src.write_text(MALLOC_COUNTER)
    lib = tmp_path / "libcount.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    code = """
    import ctypes, sys
    from shortrt.engine import Engine
    counter = ctypes.CDLL(sys.argv[2])
    counter.counter_stop.restype = ctypes.c_long
    eng = Engine(sys.argv[1], threads=2, max_seq=256)
    raw = eng._engine
    def mallocs(n):
        best = None
        for _ in range(3):
            counter.counter_start()
            raw.generate([[1, 2, 3]], n, 0.0, 0, 1.0, 0, [])
            got = counter.counter_stop()
            best = got if best is None else min(best, got)
        return best
    mallocs(8)
    print(mallocs(10), mallocs(210))
    """
    r = run_script(code, tiny, lib, timeout=60, LD_PRELOAD=str(lib))
    assert r.returncode == 0, r.stderr[-2000:]
    short, long = map(int, r.stdout.split())
    # 200 more tokens through 4 attention layers: before, 2400 more allocations.
    assert long - short < 20, (short, long)


# ---- the kernel table's decode attention on every head_dim ----------------------------

def test_decode_attention_on_both_paths_for_odd_head_dim(tmp_path):
    """head_dim 12 (not a multiple of 8): the avx2 table's attend_partial runs the reference."""
    path = make_tiny(tmp_path / "hd12", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)[0]
    ids = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5] * 15  # 150 keys: two key ranges
    before = _C.kernel_active()
    try:
        out = {}
        for path_name in _C.kernel_paths():
            _C.set_kernels(path_name)
            e = Engine(path, threads=2)
            out[path_name] = (e.logits(ids, chunk=1), e.logits(ids))
    finally:
        _C.set_kernels(before)
    for decode, prefill in out.values():
        np.testing.assert_allclose(decode, prefill, rtol=1e-4, atol=1e-4)
    if "avx2" in out:
        np.testing.assert_allclose(out["avx2"][0], out["ref"][0], rtol=1e-4, atol=1e-4)
