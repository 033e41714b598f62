"""What benchmarks/latency.py and benchmarks/runtime.py share: one engine per process, one protocol.

Worker side (a fresh process per configuration, so no engine sees another's memory or threads):

    python benchmarks/harness.py SPEC_JSON     # runs WORKERS[spec["engine"]] (or a benchmark's
                                               # "module.function"), prints "RESULT {json}"

  measure(run, ...)   the timing protocol every engine follows, given run(ids, n_new) -> (t0, stamps)
  alternating_decode  decode speed of several shortrt Engines in one process, runs alternating
  rss_bytes()         this process's peak (VmHWM) or current (VmRSS) resident memory

Driver side:

  add_run_options(p)   --threads, --prompt-tokens, --new-tokens, --worker-timeout
  run_jobs(jobs, ...)  every job once per round, interleaved; a worker that dies (signal, exit
                       code, timeout, no RESULT line) becomes a failed sample, and the run goes on
  merge_rounds(...)    one row per job: medians of its good rounds, or the failure
  prompt_ids, measure_bandwidth, llamacpp_ggufs, pruned_gguf, machine, shown_path, fmt_mib

Units: bytes everywhere; MiB (2**20) when printed; GB/s means 1e9 bytes/s.
"""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONTEXT = 2048  # tokens of KV cache every engine allocates
BANDWIDTH_BUFFER_BYTES = 512 * 2**20  # far larger than any cache here
STDERR_TAIL_LINES = 12


# ----------------------------------------------------------------------------- worker side

def rss_bytes(field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process. Not getrusage's
    ru_maxrss: a child started by subprocess inherits its parent's peak there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def timings(stamps: list[float], t0: float) -> dict:
    """Per-token figures of one generation: t0 = start, stamps = the time each new token arrived."""
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return {
        "ttft_s": stamps[0] - t0,
        "decode_tok_s": len(gaps) / (stamps[-1] - stamps[0]),
        "token_ms_p50": 1e3 * statistics.median(gaps),
        "token_ms_p90": 1e3 * gaps[int(0.9 * (len(gaps) - 1))],
    }


def measure(run, prompt: list[int], short: list[int], new_tokens: int, reps: int = 1) -> dict:
    """The protocol every engine follows; run(ids, n_new) -> (t0, per-token timestamps).

    A warm-up (pages in the weights, spins up thread pools), then `reps` prefills (one new
    token after the long prompt) and `reps` decodes (new_tokens after the short prompt).
    Medians over reps."""
    run(short, 8)
    prefill = []
    for _ in range(reps):
        t0, stamps = run(prompt, 1)
        prefill.append(len(prompt) / (stamps[0] - t0))
    decodes = []
    for _ in range(reps):
        t0, stamps = run(short, new_tokens)
        decodes.append(timings(stamps, t0))
    out = {k: statistics.median(d[k] for d in decodes) for k in decodes[0]}
    out["prefill_tok_s"] = statistics.median(prefill)
    return out


def shortrt_run(eng):
    """run(ids, n_new) for a shortrt Engine: greedy, no stop token, a timestamp per token."""
    def run(ids, n_new):
        stamps: list[float] = []
        t0 = time.perf_counter()
        eng.generate_ids(ids, max_new_tokens=n_new, stop=[],
                         callback=lambda _seq, _tok: stamps.append(time.perf_counter()) or True)
        return t0, stamps
    return run


def _short(spec: dict) -> list[int]:
    return spec["prompt"][: spec.get("decode_prompt_tokens", 16)]


def worker_shortrt(spec: dict) -> dict:
    from shortrt.engine import Engine

    t0 = time.perf_counter()
    eng = Engine(spec["path"], dtype=spec["dtype"], threads=spec["threads"], max_seq=spec["context"],
                 skip_layers=spec.get("skip") or None, lm_head_dtype=spec.get("lm_head_dtype", "same"))
    load_s = time.perf_counter() - t0
    out = measure(shortrt_run(eng), spec["prompt"], _short(spec), spec["new_tokens"], spec["reps"])
    out.update(load_s=load_s, weight_bytes=eng.weight_bytes, bytes_per_token=eng.weight_bytes_per_token,
               kv_bytes=eng.kv_cache_bytes, layers_run=eng.num_layers)  # KV allocated for `context` tokens
    return out


def alternating_decode(engines: dict, prompt: list[int], new_tokens: int, rounds: int) -> dict:
    """{name: median decode tok/s} of shortrt Engines in one process, their runs alternating
    `rounds` times so that load changes on a shared machine hit all alike. Decode rate =
    tokens after the first / time from the first token to the last (prefill excluded)."""
    runs = {name: shortrt_run(eng) for name, eng in engines.items()}
    for run in runs.values():
        run(prompt[:8], 8)  # warm-up: page in the weights, start the thread pool
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0, stamps = run(prompt, new_tokens)
            speeds[name].append(timings(stamps, t0)["decode_tok_s"])
    return {name: statistics.median(v) for name, v in speeds.items()}


def worker_shortrt_pair(spec: dict) -> dict:
    """Dense vs spec["skip"] skipped, decode only, alternating: {"dense": tok/s, "skip": tok/s}."""
    from shortrt.engine import Engine

    engines = {"dense": Engine(spec["path"], dtype=spec["dtype"], threads=spec["threads"], max_seq=spec["context"]),
               "skip": Engine(spec["path"], dtype=spec["dtype"], threads=spec["threads"], max_seq=spec["context"],
                              skip_layers=spec["skip"])}
    return alternating_decode(engines, _short(spec), spec["new_tokens"], 2 * spec["reps"])


def worker_transformers(spec: dict) -> dict:
    import torch

    import shortrt

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    model = shortrt.load(spec["path"]).load_hf(dtype)
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def run(ids, n_new):
        stamps = []
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        stamps.append(time.perf_counter())
        for _ in range(n_new - 1):
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            stamps.append(time.perf_counter())
        return t0, stamps

    out = measure(run, spec["prompt"], _short(spec), spec["new_tokens"], spec["reps"])
    cfg = model.config
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.tensor([], dtype=dtype).element_size()
    out.update(load_s=load_s, weight_bytes=n_bytes, bytes_per_token=n_bytes,
               kv_bytes=2 * cfg.num_hidden_layers * spec["context"] * kv_heads * head_dim * elem,
               layers_run=cfg.num_hidden_layers)
    return out


def worker_llamacpp(spec: dict) -> dict:
    import llama_cpp
    from gguf import GGUFReader

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=spec["context"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    feed = spec["prompt"]

    def run(ids, n_new):
        # Decode cost without llama-cpp-python's Python-side sampler: after the prompt, feed
        # fixed tokens one at a time (the other engines' greedy pick is in C++ or one argmax).
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        stamps = [time.perf_counter()]
        for i in range(n_new - 1):
            llm.eval([feed[i % len(feed)]])
            stamps.append(time.perf_counter())
        return t0, stamps

    out = measure(run, spec["prompt"], _short(spec), spec["new_tokens"], spec["reps"])
    n_bytes = sum(int(t.n_bytes) for t in GGUFReader(spec["path"]).tensors)
    meta = llm.metadata
    arch = meta.get("general.architecture", "llama")
    n_layers = int(meta.get(f"{arch}.block_count", 0)) or None
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", 0))
    head_dim = (int(meta.get(f"{arch}.attention.key_length", 0))
                or int(meta.get(f"{arch}.embedding_length", 0)) // int(meta.get(f"{arch}.attention.head_count", 1)))
    out.update(load_s=load_s, weight_bytes=n_bytes, bytes_per_token=n_bytes,
               kv_bytes=2 * (n_layers or 0) * spec["context"] * kv_heads * head_dim * 2,  # f16 cache
               layers_run=n_layers)
    return out


WORKERS = {"shortrt": worker_shortrt, "shortrt-pair": worker_shortrt_pair,
           "transformers": worker_transformers, "llama.cpp": worker_llamacpp}


def worker_function(engine: str):
    """WORKERS[engine], or for "module.function" that function of a benchmark module beside this
    file (a benchmark's own kind of worker, e.g. "llama_cpp_quality.worker_llamacpp")."""
    if engine in WORKERS:
        return WORKERS[engine]
    module, _, name = engine.rpartition(".")
    if not module:
        raise ValueError(f"unknown worker {engine!r}: one of {', '.join(WORKERS)} or module.function")
    import importlib

    return getattr(importlib.import_module(module), name)


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("module"):  # a benchmark with workers of its own (gpu.py): its WORKERS dict
        import importlib

        WORKERS.update(importlib.import_module(spec["module"]).WORKERS)
    base = rss_bytes("VmRSS")  # interpreter + imports, before any engine exists
    result = worker_function(spec["engine"])(spec)
    result.update(peak_rss_bytes=rss_bytes(), base_rss_bytes=base)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver side

def add_run_options(p) -> None:
    """The command-line options every harness-driven benchmark takes."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--worker-timeout", type=float, default=900,
                   help="seconds one worker may run before it is killed and its row marked failed")


def worker_command(spec: dict) -> list[str]:
    """The command line of the process that measures one job."""
    return [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]


def _tail(text: str) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-STDERR_TAIL_LINES:])


def run_worker(spec: dict, timeout_s: float | None = None) -> dict:
    """The worker's RESULT dict, or {"failed": why, "returncode": ..., "stderr_tail": ...} when it
    was killed by a signal, exited non-zero, ran past timeout_s or printed no parseable result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if spec.get("kernels"):  # a shortrt kernel path forced for this worker (ref, avx2, avx512)
        env["SHORTRT_KERNELS"] = spec["kernels"]
    try:
        proc = subprocess.run(worker_command(spec), capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        return {"failed": f"timed out after {timeout_s:g} s", "returncode": None, "stderr_tail": _tail(err)}
    rc = proc.returncode
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        why = f"killed by {name}"
    elif rc > 0:
        why = f"exit code {rc}"
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        try:
            result = json.loads(lines[-1][len("RESULT "):])
            if isinstance(result, dict):
                return result
        except (IndexError, json.JSONDecodeError):
            pass
        why = "no parseable RESULT line on stdout"
    return {"failed": why, "returncode": rc, "stderr_tail": _tail(proc.stderr)}


def run_jobs(jobs: list[dict], common: dict, rounds: int, timeout_s: float | None = None,
             on_sample=None, on_round=None) -> list[list[dict]]:
    """samples[i] = job i's results, one per round, rounds interleaved so drift hits all alike.
    Each worker gets {**common, **job} as its spec. A job that failed is not run again in later
    rounds (its crash is usually deterministic). on_round(round_index) is called before each
    round, on_sample(round_index, job, result) after each worker, e.g. to print progress."""
    samples: list[list[dict]] = [[] for _ in jobs]
    for r in range(rounds):
        if on_round:
            on_round(r)
        for i, job in enumerate(jobs):
            if any("failed" in s for s in samples[i]):
                continue
            result = run_worker({**common, **job}, timeout_s)
            samples[i].append(result)
            if on_sample:
                on_sample(r, job, result)
    return samples


def merge_rounds(job: dict, samples: list[dict]) -> dict:
    """One row: the job, the medians of its good rounds' numbers (non-numbers from the first),
    and the failure, if any; a row with no good round carries "failed" and no numbers."""
    good = [s for s in samples if "failed" not in s]
    bad = [s for s in samples if "failed" in s]
    row = dict(job)
    if good:
        for key, value in good[0].items():
            numbers = [s.get(key) for s in good]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                row[key] = statistics.median(numbers)
            else:
                row[key] = value
    row["rounds"] = len(good)
    if bad:
        key = "failed" if not good else "failed_round"
        row[key] = bad[0]["failed"]
        row["returncode"] = bad[0]["returncode"]
        row["stderr_tail"] = bad[0]["stderr_tail"]
    return row


def agreement(row: dict, ref: dict) -> dict:
    """How a quality row (its "logits", "greedy" tokens and "ppl") compares with the fp32 reference
    row: the largest logit error over the largest logit, where greedy decoding first differs and how
    many tokens agree, and the perplexity ratio."""
    import numpy as np

    same = [a == b for a, b in zip(row["greedy"], ref["greedy"])]
    return {"rel_err": float(np.abs(row["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max()),
            "greedy_first_diff": same.index(False) if False in same else len(same),
            "greedy_equal": sum(same), "ppl_vs_fp32": row["ppl"] / ref["ppl"]}


def failures(rows: list[dict]) -> list[str]:
    """A paragraph per row that failed in some round: label, reason, the tail of its stderr."""
    out = []
    for r in rows:
        why = r.get("failed") or r.get("failed_round")
        if why:
            what = "FAILED" if "failed" in r else f"failed in a later round (kept {r['rounds']} good)"
            name = " ".join(str(r[k]) for k in ("label", "variant") if k in r)
            tail = "\n".join("    " + ln for ln in (r.get("stderr_tail") or "(no stderr)").splitlines())
            out.append(f"{name}: {what}: {why}; last lines of its stderr:\n{tail}")
    return out


def prompt_ids(tokenizer_dir, n: int, texts) -> list[int]:
    """The first n token ids of `texts` (an iterable of str) under the checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text).ids
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the prompt text gives only {len(ids)} tokens, {n} needed")


def measure_bandwidth(threads: int, buffer_bytes: int = BANDWIDTH_BUFFER_BYTES, reps: int = 9) -> float:
    """Read bandwidth in bytes/s: the better of 4 KiB and 2 MiB pages, each the median time
    over `reps` passes of shortrt's fastest sum over a buffer far larger than the caches.
    The fastest way this machine streams memory is what bounds decode."""
    from shortrt import _C

    n_bytes = buffer_bytes // 4 * 4  # whole floats
    best = 0.0
    for huge in (False, True):
        # bench_read_bandwidth takes the size in MB (1e6 bytes)
        seconds = _C.bench_read_bandwidth(n_bytes / 1e6, "auto", threads, reps, huge)["wall"]
        best = max(best, n_bytes / statistics.median(seconds))
    return best


LLAMACPP_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
LLAMACPP_FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                   "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                   "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def llamacpp_source(model) -> Path:
    """The GGUF that llama.cpp's formats of `model` are quantized from: the file the default model
    ships (Q4_1, which dequantizes exactly), else an F32 GGUF exported once by shortrt (cached)."""
    import shortrt
    from shortrt.checkpoint import cache_dir
    from shortrt.gguf_export import export_gguf, origin_gguf

    m = shortrt.load(model)
    origin = origin_gguf(m)  # the default model's shipped file, or the GGUF a checkpoint came from
    if origin is not None:
        return origin
    dst = cache_dir() / "bench" / "gguf" / f"{m.path.name}-F32.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(m, dst, qtype="f32", progress=True)
    return dst


def llamacpp_ggufs(types=LLAMACPP_TYPES, source=None) -> dict[str, Path]:
    """{type: GGUF} of the model whose GGUF is `source` (default: the default model's Q4_1 file),
    re-quantized by llama.cpp's quantize API (cached). The default model's Q4_1 dequantizes exactly,
    so every format holds the values the safetensors checkpoint holds and all engines run the same
    model; llama.cpp chooses the output tensor's format itself (e.g. Q6_K in a Q4_0 file)."""
    import ctypes

    from shortrt.checkpoint import cache_dir, default_gguf_path

    unknown = [t for t in types if t not in LLAMACPP_FTYPES]
    if unknown:
        raise ValueError(f"unknown llama.cpp type(s) {', '.join(unknown)} (known: {', '.join(LLAMACPP_FTYPES)})")
    import llama_cpp

    src = Path(source) if source is not None else default_gguf_path()
    base = re.sub(r"\.(Q[0-9A-Z_]+|F16|F32|BF16)$", "", src.stem.removesuffix("-F32"))
    out = {}
    for name in types:
        dst = cache_dir() / "bench" / "gguf" / f"{base}-{name}.gguf"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, LLAMACPP_FTYPES[name])
            params.allow_requantize = True
            params.nthread = 2
            tmp = dst.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
            tmp.rename(dst)
        out[name] = dst
    return out


def pruned_gguf(dense_gguf, ckpt_dir) -> Path | None:
    """The dense GGUF with the layers the pruned checkpoint removed taken out (cached), or None
    when the checkpoint has entries a GGUF of plain layers cannot hold (no attention, replacements)."""
    from shortrt.gguf_export import prune_gguf
    from shortrt.layermap import layer_map_of

    lmap = layer_map_of(ckpt_dir)
    if len(lmap.retained) != len(lmap.layers) or not lmap.transformers_compatible:
        return None
    dst = Path(ckpt_dir) / (Path(dense_gguf).stem + ".gguf")
    if not dst.exists():
        prune_gguf(str(dense_gguf), lmap.retained, dst)
    return dst


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def shown_path(path) -> str | None:
    """A path as results record it: "<cache>/..." inside $SHORTRT_CACHE, relative inside the
    repository, else as given; never the measuring machine's home or checkout."""
    if path is None:
        return None
    from shortrt.checkpoint import cache_dir

    p = Path(path).resolve()
    for root, shown in ((cache_dir().resolve(), "<cache>"), (REPO, None)):
        try:
            rel = p.relative_to(root)
        except ValueError:
            continue
        return f"{shown}/{rel}" if shown else str(rel)
    return str(path)


def shown_args(args, path_keys=("scores", "json", "md", "png")) -> dict:
    """A run's arguments as results record them (paths through shown_path)."""
    return {k: shown_path(v) if k in path_keys else v for k, v in vars(args).items() if k != "worker"}


def save_report(args, result: dict, md: str, rows: list, plot) -> None:
    """The --json, --md and --png outputs of a run; the chart leaves failed rows out."""
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(md + "\n")
    if args.png:
        plot([r for r in rows if "failed" not in r], args.png)


def fmt_mib(n_bytes, decimals: int = 1, unit: str = "") -> str:
    """Bytes as MiB (2**20) for a table cell; "-" for None."""
    return "-" if n_bytes is None else f"{n_bytes / 2**20:,.{decimals}f}{unit}"


if __name__ == "__main__":
    worker_main(sys.argv[1])
