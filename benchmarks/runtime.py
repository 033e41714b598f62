"""Speed and memory of shortrt's C++ runtime on the default model (issue: the C++ runtime).

Batch 1, fixed thread count. For shortrt fp32/bf16/int8, dense and with 8 of 30
layers skipped, beside transformers fp32 and llama.cpp F32/F16/Q8_0 (when
llama-cpp-python is installed), each configuration in its own process (benchmarks/harness.py;
a worker that crashes or hangs becomes a failed row and the run goes on):

  decode tok/s   median over reps of 128 new tokens after a 16-token prompt
  prefill tok/s  median over reps of a 512-token prompt (time to its first new token)
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
import itertools
import json
import statistics
import sys
from pathlib import Path

import harness
from harness import CONTEXT, fmt_mib as mib, shown_path

SKIP8 = [20, 21, 22, 23, 24, 25, 26, 27]  # which 8 does not change the speed; deep layers are what BI removes
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries the market grew into a town, the town into a city, and the "
        "city into the capital of a wide region. Its libraries kept the records of every harvest and every "
        "storm, and its scholars wrote about mathematics, medicine and the motion of the stars. ")
# The harness's result names -> the names this benchmark's rows and JSON have always used.
ROW_NAMES = {"decode_tok_s": "decode", "prefill_tok_s": "prefill", "layers_run": "layers",
             "peak_rss_bytes": "peak_rss", "base_rss_bytes": "base_rss"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint to measure (default %(default)s)")
    p.add_argument("--skip", default=",".join(map(str, SKIP8)),
                   help="layers the pruned rows skip (default %(default)s)")
    harness.add_run_options(p)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, interleaved, and take medians (drift hits all alike)")
    p.add_argument("--quick", action="store_true", help="3 reps, shortrt only")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", type=Path, help="write the rows here")
    return p.parse_args(argv)


def runtime_row(job: dict, samples: list[dict]) -> dict:
    """The harness's merged row under this benchmark's names, with engine-only memory and budget."""
    r = {ROW_NAMES.get(k, k): v for k, v in harness.merge_rounds(job, samples).items()}
    if "failed" in r:
        return r
    r["engine_rss"] = r["peak_rss"] - r["base_rss"]
    # The memory budget: weights + KV cache + 64 MiB (shortrt rows only).
    r["budget"] = r["weight_bytes"] + r["kv_bytes"] + 64 * 2**20 if r["engine"] == "shortrt" else None
    return r


def print_row(r: dict) -> None:
    if "failed" in r:
        print(f"{r['label']:<26}  FAILED: {r['failed']}", flush=True)
        return
    print(f"{r['label']:<26}{r['layers']:>7}{r['decode']:>9.1f}{r['bound']:>8.1f}"
          f"{100 * r['decode'] / r['bound']:>7.0f}%{r['prefill']:>9.1f}{mib(r['weight_bytes']):>9}"
          f"{mib(r['bytes_per_token']):>10}{mib(r['kv_bytes']):>8}{mib(r['peak_rss']):>9}{mib(r['engine_rss']):>8}"
          f"{mib(r['budget']):>9}", flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    import shortrt

    model = shortrt.load(a.model)
    skip = [int(x) for x in a.skip.split(",") if x.strip()]
    pruned = f" -{len(skip)} layers"
    reps = 3 if a.quick else a.reps
    common = dict(path=str(model.path), threads=a.threads, reps=reps, new_tokens=a.new_tokens, context=CONTEXT,
                  decode_prompt_tokens=16, prompt=harness.prompt_ids(model.path, a.prompt_tokens, itertools.repeat(TEXT)))
    jobs = [dict(engine="shortrt", dtype=d, skip=s, label=f"shortrt {d}" + (pruned if s else ""))
            for s in ([], skip) for d in ("fp32", "bf16", "int8")]
    if not (a.quick or a.no_transformers):
        jobs.append(dict(engine="transformers", dtype="fp32", label="transformers fp32"))
    llama_missing = None
    if not (a.quick or a.no_llamacpp):
        try:
            for name, path in harness.llamacpp_ggufs().items():
                jobs.append(dict(engine="llama.cpp", dtype=name, path=str(path), label=f"llama.cpp {name}"))
        except ImportError:
            llama_missing = "llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); skipped"

    bandwidths = [harness.measure_bandwidth(a.threads)]
    print(f"read bandwidth ({a.threads} threads): {bandwidths[0] / 1e9:.1f} GB/s; batch 1, {a.threads} threads, "
          f"{reps} reps x {a.rounds} rounds, decode {a.new_tokens} tokens, prefill {a.prompt_tokens} tokens, context {CONTEXT}")
    if llama_missing:
        print(llama_missing)
    header = (f"{'engine':<26}{'layers':>7}{'decode':>9}{'bound':>8}{'%bound':>8}{'prefill':>9}"
              f"{'weights':>9}{'read/tok':>10}{'KV':>8}{'peakRSS':>9}{'engine':>8}{'budget':>9}")
    print(header + "\n" + " " * 33 + "tok/s   tok/s            tok/s      MiB       MiB     MiB      MiB     MiB      MiB")

    def new_round(i):
        if i:  # the machine may be shared: re-measure each round, use the median
            bandwidths.append(harness.measure_bandwidth(a.threads))

    def progress(i, job, r):
        state = (f"FAILED: {r['failed']}" if "failed" in r
                 else f"decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s")
        print(f"  round {i + 1}/{a.rounds}: {job['label']}: {state}", file=sys.stderr, flush=True)

    samples = harness.run_jobs(jobs, common, a.rounds, a.worker_timeout, progress, new_round)
    bandwidth = statistics.median(bandwidths)
    if a.rounds > 1:
        print(f"read bandwidth per round: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s; "
              f"median {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for job, runs in zip(jobs, samples):
        r = runtime_row(job, runs)
        if "failed" not in r:
            r["bound"] = bandwidth / r["bytes_per_token"]
        rows.append(r)
        print_row(r)

    by = {r["label"]: r for r in rows if "failed" not in r}

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
    if "shortrt fp32" in by and "shortrt fp32" + pruned in by:
        ideal = by["shortrt fp32"]["bytes_per_token"] / by["shortrt fp32" + pruned]["bytes_per_token"]
        print(f"  decode{pruned} / dense, measured in one process with alternating reps "
              f"(ideal = ratio of bytes read per token, {ideal:.2f}x for fp32):")
    n_layers = int(model.config()["num_hidden_layers"])
    for d in ("fp32", "bf16", "int8"):
        spec = dict(engine="shortrt-pair", dtype=d, skip=skip)
        pair = harness.merge_rounds({"label": f"pair {d}"}, harness.run_jobs([spec], common, 1, a.worker_timeout)[0])
        rows.append(pair)
        if "failed" in pair:
            print(f"    {d}: FAILED: {pair['failed']}")
        else:
            v = pair["skip"] / pair["dense"]
            print(f"    {d}: {pair['skip']:.1f} / {pair['dense']:.1f} tok/s = {v:.2f}x" +
                  ("  ok" if v >= 1.2 else "  MISSED (target 1.2x)"))
        ratio(f"shortrt {d}{pruned}", f"shortrt {d}")  # separate processes: drift shows here
        if f"shortrt {d}" in by and f"shortrt {d}{pruned}" in by:
            dense, kept = by[f"shortrt {d}"], by[f"shortrt {d}{pruned}"]
            left = n_layers - len(skip)
            print(f"  KV cache {d}: pruned / dense = {kept['kv_bytes'] / dense['kv_bytes']:.4f} "
                  f"({left}/{n_layers} = {left / n_layers:.4f})")
    for r in rows:
        if r.get("budget") is not None:
            over = r["engine_rss"] - r["budget"]
            print(f"  memory {r['label']}: engine peak {mib(r['engine_rss'])} MiB vs weights + KV + 64 MiB = "
                  f"{mib(r['budget'])} MiB: " + ("ok" if over <= 0 else f"over by {mib(over)} MiB"))
    failed = harness.failures(rows)
    if failed:
        print("\nfailed workers:\n" + "\n".join(failed))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            if "path" in r:
                r["path"] = shown_path(r["path"])
        doc = {"machine": harness.machine(), "bandwidth": bandwidth, "threads": a.threads, "rows": rows}
        a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
