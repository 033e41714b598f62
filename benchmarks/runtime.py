"""Speed and memory of shortrt's C++ runtime on the default model (issue: the C++ runtime).

Batch 1, fixed thread count. For shortrt fp32/bf16/int8, dense and with 8 of 30
layers skipped, beside transformers fp32 and llama.cpp F32/F16/Q8_0 (when
llama-cpp-python is installed), each configuration in its own process:

  decode tok/s   median over reps of 128 new tokens after a 16-token prompt
  prefill tok/s  median over reps of a 512-token prompt (logits of the last position only)
  weight / KV bytes, bytes read per decoded token, peak resident memory (VmHWM) of the
                 process and of the engine alone (peak minus the resident size after imports)
  bound tok/s    read bandwidth measured here / bytes read per token: the ceiling
                 a memory-bound decoder can reach

    python benchmarks/runtime.py                  # ~3-5 minutes on 2 cores
    python benchmarks/runtime.py --quick          # fewer reps, shortrt only
    python benchmarks/runtime.py --json benchmarks/results/runtime.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTEXT = 2048
SKIP8 = [20, 21, 22, 23, 24, 25, 26, 27]  # which 8 does not change the speed; deep layers are what BI removes
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries the market grew into a town, the town into a city, and the "
        "city into the capital of a wide region. Its libraries kept the records of every harvest and every "
        "storm, and its scholars wrote about mathematics, medicine and the motion of the stars. ")


def rss_bytes(field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process. Not ru_maxrss: a child
    started by subprocess inherits its parent's peak there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------- workers (one per process)

def worker_shortrt(a) -> dict:
    from shortrt.engine import Engine

    base_rss = rss_bytes("VmRSS")  # interpreter + imports, before the engine exists
    t0 = time.perf_counter()
    eng = Engine(a.model, dtype=a.dtype, threads=a.threads, max_seq=CONTEXT, skip_layers=a.skip)
    load_s = time.perf_counter() - t0
    prompt, short = a.prompt, a.prompt[:16]
    eng.generate_ids(short, max_new_tokens=8, stop=[])  # warm-up: page in the weights
    prefill = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        eng.generate_ids(prompt, max_new_tokens=1, stop=[])
        prefill.append(len(prompt) / (time.perf_counter() - t0))
    decode = []
    for _ in range(a.reps):
        stamps = []
        eng.generate_ids(short, max_new_tokens=a.new_tokens, stop=[],
                         callback=lambda s, t: stamps.append(time.perf_counter()))
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return dict(decode=statistics.median(decode), prefill=statistics.median(prefill), load_s=load_s,
                weight_bytes=eng.weight_bytes, bytes_per_token=eng.weight_bytes_per_token,
                kv_bytes=eng.kv_cache_bytes, layers=eng.num_layers, peak_rss=rss_bytes(), base_rss=base_rss)


def worker_transformers(a) -> dict:
    import torch

    import shortrt

    torch.set_num_threads(a.threads)
    base_rss = rss_bytes("VmRSS")  # interpreter + imports, before the model exists
    model = shortrt.load(a.model).load_hf(torch.float32)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.tensor([a.prompt])
    short = torch.tensor([a.prompt[:16]])
    with torch.inference_mode():
        model(short)
        prefill = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            model(prompt, logits_to_keep=1)
            prefill.append(prompt.shape[1] / (time.perf_counter() - t0))
        decode = []
        for _ in range(a.reps):
            out = model(short, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            past = out.past_key_values
            t0 = time.perf_counter()
            for _ in range(a.new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            decode.append((a.new_tokens - 1) / (time.perf_counter() - t0))
    return dict(decode=statistics.median(decode), prefill=statistics.median(prefill), weight_bytes=n_bytes,
                bytes_per_token=n_bytes, kv_bytes=None, layers=model.config.num_hidden_layers,
                peak_rss=rss_bytes(), base_rss=base_rss)


def worker_llamacpp(a) -> dict:
    import llama_cpp

    base_rss = rss_bytes("VmRSS")  # interpreter + imports, before the model exists
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=CONTEXT, n_threads=a.threads, n_threads_batch=a.threads,
                          n_batch=512, verbose=False)
    prompt, short = a.prompt, a.prompt[:16]
    llm.reset()
    llm.eval(short)
    prefill = []
    for _ in range(a.reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - t0))
    # Decode cost without llama-cpp-python's Python-side sampler: feed fixed tokens one at a time.
    decode = []
    for _ in range(a.reps):
        llm.reset()
        llm.eval(short)
        t0 = time.perf_counter()
        for i in range(a.new_tokens - 1):
            llm.eval([prompt[16 + i % (len(prompt) - 16)]])
        decode.append((a.new_tokens - 1) / (time.perf_counter() - t0))
    size = os.path.getsize(a.gguf)
    return dict(decode=statistics.median(decode), prefill=statistics.median(prefill), weight_bytes=size,
                bytes_per_token=size, kv_bytes=None, layers=30, peak_rss=rss_bytes(), base_rss=base_rss)


def worker_pair(a) -> dict:
    """Dense vs 8-layers-skipped decode in one process, reps alternating, so that load
    changes on a shared machine hit both alike (the ratio is what the issue asks for)."""
    from shortrt.engine import Engine

    engines = {"dense": Engine(a.model, dtype=a.dtype, threads=a.threads, max_seq=CONTEXT),
               "skip": Engine(a.model, dtype=a.dtype, threads=a.threads, max_seq=CONTEXT, skip_layers=a.skip)}
    short = a.prompt[:16]
    speeds = {k: [] for k in engines}
    for e in engines.values():
        e.generate_ids(short, max_new_tokens=8, stop=[])
    for _ in range(2 * a.reps):
        for k, e in engines.items():
            stamps = []
            e.generate_ids(short, max_new_tokens=a.new_tokens, stop=[],
                           callback=lambda s, t: stamps.append(time.perf_counter()))
            speeds[k].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {k: statistics.median(v) for k, v in speeds.items()}


WORKERS = {"pair": worker_pair, "shortrt": worker_shortrt, "transformers": worker_transformers, "llama.cpp": worker_llamacpp}


# --------------------------------------------------------------------------- driver

def measure_bandwidth(threads: int) -> float:
    """Read bandwidth (bytes/s): median over passes of summing a 1 GiB buffer, all threads."""
    from shortrt import _C

    seconds = _C.bench_read_bandwidth(1024, "auto", threads, 7)["wall"]
    return 1024 * 2**20 / statistics.median(seconds)


def prompt_ids(model_dir: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(TEXT).ids
    return ids[:n]


def llamacpp_ggufs() -> dict[str, Path]:
    """F32 / F16 / Q8_0 GGUFs of the default model, re-quantized from its Q4_1 file (cached).

    Every format then holds exactly the values the safetensors checkpoint holds (Q4_1
    dequantizes exactly to F32), so all engines run the same model.
    """
    import ctypes

    import llama_cpp

    from shortrt.checkpoint import cache_dir, default_gguf_path

    src = default_gguf_path()
    out = {}
    for name, ftype in (("F32", llama_cpp.LLAMA_FTYPE_ALL_F32), ("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16),
                        ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        dst = cache_dir() / "bench" / "gguf" / f"SmolLM2-135M-Instruct-{name}.gguf"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            tmp = dst.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
            tmp.rename(dst)
        out[name] = dst
    return out


def run_worker(job: dict, common: dict) -> dict:
    spec = json.dumps({**common, **job})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return {**job, **json.loads(proc.stdout.strip().splitlines()[-1])}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, interleaved, and take medians (drift hits all alike)")
    p.add_argument("--quick", action="store_true", help="3 reps, shortrt only")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        spec = argparse.Namespace(**json.loads(a.worker))
        print(json.dumps(WORKERS[spec.engine](spec)))
        return

    import shortrt

    model = shortrt.load("default")
    reps = 3 if a.quick else a.reps
    common = dict(model=str(model.path), threads=a.threads, reps=reps, new_tokens=a.new_tokens,
                  prompt=prompt_ids(model.path, a.prompt_tokens))
    jobs = [dict(engine="shortrt", dtype=d, skip=s, label=f"shortrt {d}" + (" -8 layers" if s else ""))
            for s in ([], SKIP8) for d in ("fp32", "bf16", "int8")]
    if not (a.quick or a.no_transformers):
        jobs.append(dict(engine="transformers", label="transformers fp32"))
    llama_missing = None
    if not (a.quick or a.no_llamacpp):
        try:
            for name, path in llamacpp_ggufs().items():
                jobs.append(dict(engine="llama.cpp", gguf=str(path), label=f"llama.cpp {name}"))
        except ImportError:
            llama_missing = "llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); skipped"

    bandwidths = [measure_bandwidth(a.threads)]
    bandwidth = bandwidths[0]
    print(f"read bandwidth ({a.threads} threads): {bandwidth / 1e9:.1f} GB/s; batch 1, {a.threads} threads, "
          f"{reps} reps x {a.rounds} rounds, decode {a.new_tokens} tokens, prefill {a.prompt_tokens} tokens, context {CONTEXT}")
    if llama_missing:
        print(llama_missing)
    rows = []
    header = (f"{'engine':<26}{'layers':>7}{'decode':>9}{'bound':>8}{'%bound':>8}{'prefill':>9}"
              f"{'weights':>9}{'read/tok':>10}{'KV':>8}{'peakRSS':>9}{'engine':>8}{'budget':>9}")
    print(header + "\n" + " " * 33 + "tok/s   tok/s            tok/s      MiB       MiB     MiB      MiB     MiB      MiB")
    results: dict[str, list[dict]] = {job["label"]: [] for job in jobs}
    for i in range(a.rounds):
        if i:  # the machine may be shared: re-measure each round, use the median
            bandwidths.append(measure_bandwidth(a.threads))
        for job in jobs:
            r = run_worker(job, common)
            results[job["label"]].append(r)
            print(f"  round {i + 1}/{a.rounds}: {job['label']}: decode {r['decode']:.1f} tok/s, "
                  f"prefill {r['prefill']:.1f} tok/s", file=sys.stderr, flush=True)
    bandwidth = statistics.median(bandwidths)
    if a.rounds > 1:
        print(f"read bandwidth per round: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s; "
              f"median {bandwidth / 1e9:.1f} GB/s")
    for job in jobs:
        runs = results[job["label"]]
        r = dict(runs[0])
        for key in ("decode", "prefill", "peak_rss", "base_rss"):
            r[key] = statistics.median(run[key] for run in runs)
        r["engine_rss"] = r["peak_rss"] - r["base_rss"]
        r["bound"] = bandwidth / r["bytes_per_token"]
        # The memory budget: weights + KV cache + 64 MiB (shortrt rows only).
        r["budget"] = r["weight_bytes"] + r["kv_bytes"] + 64 * 2**20 if r["kv_bytes"] is not None else None
        rows.append(r)
        print(f"{r['label']:<26}{r['layers']:>7}{r['decode']:>9.1f}{r['bound']:>8.1f}"
              f"{100 * r['decode'] / r['bound']:>7.0f}%{r['prefill']:>9.1f}{mib(r['weight_bytes']):>9}"
              f"{mib(r['bytes_per_token']):>10}{mib(r['kv_bytes']):>8}{mib(r['peak_rss']):>9}{mib(r['engine_rss']):>8}"
              f"{mib(r['budget']):>9}", flush=True)

    by = {r["label"]: r for r in rows}

    def ratio(a_label, b_label, key="decode", target=None):
        if a_label in by and b_label in by:
            v = by[a_label][key] / by[b_label][key]
            verdict = "" if target is None else ("  ok" if v >= target else f"  MISSED (target {target}x)")
            print(f"  {key:<8}{a_label:>24} / {b_label:<24}{v:6.2f}x{verdict}")

    print("\nratios (targets from the issue):")
    ratio("shortrt fp32", "llama.cpp F32", target=1.1)
    ratio("shortrt bf16", "llama.cpp F16", target=1.1)
    ratio("shortrt int8", "llama.cpp Q8_0", target=1.3)
    ratio("shortrt fp32", "transformers fp32", target=3.0)
    for ref in ("llama.cpp F32", "transformers fp32"):
        ratio("shortrt fp32", ref, key="prefill", target=1.2)
    ideal = by["shortrt fp32"]["bytes_per_token"] / by["shortrt fp32 -8 layers"]["bytes_per_token"]
    print(f"  decode -8 layers / dense, measured in one process with alternating reps "
          f"(ideal = ratio of bytes read per token, {ideal:.2f}x for fp32):")
    for d in ("fp32", "bf16", "int8"):
        pair = run_worker(dict(engine="pair", dtype=d, skip=SKIP8), common)
        v = pair["skip"] / pair["dense"]
        print(f"    {d}: {pair['skip']:.1f} / {pair['dense']:.1f} tok/s = {v:.2f}x" +
              ("  ok" if v >= 1.2 else "  MISSED (target 1.2x)"))
        rows.append(dict(label=f"pair {d}", **pair))
        ratio(f"shortrt {d} -8 layers", f"shortrt {d}")  # separate processes: drift shows here
        dense, pruned = by[f"shortrt {d}"], by[f"shortrt {d} -8 layers"]
        print(f"  KV cache {d}: pruned / dense = {pruned['kv_bytes'] / dense['kv_bytes']:.4f} (22/30 = {22 / 30:.4f})")
    for r in rows:
        if r.get("budget") is not None:
            over = r["engine_rss"] - r["budget"]
            print(f"  memory {r['label']}: engine peak {mib(r['engine_rss'])} MiB vs weights + KV + 64 MiB = "
                  f"{mib(r['budget'])} MiB: " + ("ok" if over <= 0 else f"over by {mib(over)} MiB"))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r.pop("prompt", None)
        a.json.write_text(json.dumps({"bandwidth": bandwidth, "threads": a.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
