"""The kernel paths (avx2, avx512, avx512bf16, amx: those this CPU has) side by side on the default model,
beside transformers fp32.

For shortrt fp32 / bf16 / int8 on each kernel path this CPU has (SHORTRT_KERNELS
set per worker; benchmarks/harness.py runs each configuration in its own
process, rounds interleaved so drift on a shared machine hits all alike):

  prefill tok/s   a 512-token prompt, time to its first new token (median over reps)
  decode tok/s    128 new tokens after a 16-token prompt
  step ms         one engine step with b sequences decoding (b = 1 and 8; the paths
                  take turns on one engine per dtype, as in benchmarks/batch_step.py)

and transformers fp32 on the same prompt. Ratios: each dtype's path / the first path, int8 /
fp32 prefill per path (issue target >= 2), shortrt / transformers fp32 prefill
(issue target >= 1.2 over the faster of transformers fp32 and llama.cpp's format).

    python benchmarks/kernel_paths.py                       # ~15 minutes on 2 cores
    python benchmarks/kernel_paths.py --json benchmarks/results/kernel_paths.json --md benchmarks/results/kernel_paths.md
    python benchmarks/kernel_paths.py --paths avx512,avx512bf16 --dtypes bf16   # bf16: f32 vs bf16 activations
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import harness
from batch_step import time_steps
from harness import CONTEXT
from runtime import TEXT

DTYPES = ("fp32", "bf16", "int8")


def parse_args(argv=None):
    from shortrt import _C

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--paths", default=",".join(x for x in _C.kernel_paths() if x != "ref"),
                   help="kernel paths to compare (default: the fast ones this CPU has)")
    harness.add_run_options(p)
    p.add_argument("--dtypes", default=",".join(DTYPES), help="weight dtypes to time (default %(default)s)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8", help="sequences decoding per timed step (default %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per batch, path and round")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    return p.parse_args(argv)


def batched_steps(model, paths, batches, threads, steps, rounds, dtypes=DTYPES) -> dict:
    """{(dtype, path, b): median ms per decode step}; the paths take turns on one engine per dtype."""
    import shortrt
    from shortrt import _C

    out = {}
    before = _C.kernel_active()
    try:
        for dtype in dtypes:
            eng = shortrt.Engine(model, dtype=dtype, threads=threads, max_batch=max(batches))
            samples = {(p, b): [] for p in paths for b in batches}
            for _ in range(rounds):
                for b in batches:
                    for p in paths:
                        _C.set_kernels(p)
                        samples[(p, b)] += time_steps(eng, b, steps, prefill_steps=2)
            out.update({(dtype, p, b): 1e3 * statistics.median(v) for (p, b), v in samples.items()})
            del eng
    finally:
        _C.set_kernels(before)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import shortrt

    model = shortrt.load(a.model)
    paths = a.paths.split(",")
    dtypes = [d for d in a.dtypes.split(",") if d]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise SystemExit(f"--dtypes: unknown {', '.join(unknown)} (expected some of {', '.join(DTYPES)})")
    batches = [int(b) for b in a.batches.split(",")]
    common = dict(path=str(model.path), threads=a.threads, reps=a.reps, new_tokens=a.new_tokens, context=CONTEXT,
                  decode_prompt_tokens=16, prompt=harness.prompt_ids(model.path, a.prompt_tokens, itertools.repeat(TEXT)))
    jobs = [dict(engine="shortrt", dtype=d, kernels=p, label=f"shortrt {d} {p}") for d in dtypes for p in paths]
    if not a.no_transformers:
        jobs.append(dict(engine="transformers", dtype="fp32", label="transformers fp32"))
    mach = harness.machine()
    print(f"{mach['cpu']}, {mach['cores']} cores; {a.threads} threads, batch 1, prefill {a.prompt_tokens} tokens, "
          f"decode {a.new_tokens}, {a.reps} reps x {a.rounds} rounds", flush=True)

    def progress(i, job, r):
        state = (f"FAILED: {r['failed']}" if "failed" in r
                 else f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
        print(f"  round {i + 1}/{a.rounds}: {job['label']}: {state}", file=sys.stderr, flush=True)

    samples = harness.run_jobs(jobs, common, a.rounds, a.worker_timeout, progress)
    rows = [harness.merge_rounds(j, s) for j, s in zip(jobs, samples)]
    by = {(r["engine"], r["dtype"], r.get("kernels")): r for r in rows if "failed" not in r}
    steps = batched_steps(model, paths, batches, a.threads, a.steps, a.rounds, dtypes)

    command = " ".join(["python", "benchmarks/kernel_paths.py", *sys.argv[1:]])
    lines = [f"`{command}` on {mach['cpu']}, {mach['cores']} cores, {mach['date']}; {a.threads} threads, batch 1, "
             f"prefill {a.prompt_tokens} tokens, decode {a.new_tokens}, medians of {a.reps} reps x {a.rounds} rounds. "
             "The machine may be shared: compare ratios within this table, not across runs.", "",
             f"| engine | dtype | kernel path | prefill tok/s | decode tok/s | "
             + " | ".join(f"step ms b={b}" for b in batches) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(batches)]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['engine']} | {r['dtype']} | {r.get('kernels') or '-'} | FAILED: {r['failed']} | | "
                         + " | " * len(batches))
            continue
        cells = [f"{steps[(r['dtype'], r['kernels'], b)]:.2f}" if r["engine"] == "shortrt" else "-" for b in batches]
        lines.append(f"| {r['engine']} | {r['dtype']} | {r.get('kernels') or '-'} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | " + " | ".join(cells) + " |")
    ratios = []

    def ratio(name, num, den, key="prefill_tok_s", target=None):
        if num in by and den in by:
            v = by[num][key] / by[den][key]
            mark = "" if target is None else (" (target >= %g: %s)" % (target, "met" if v >= target else "MISSED"))
            ratios.append(dict(name=name, value=v, target=target))
            lines.append(f"- {name}: {v:.2f}x{mark}")

    lines.append("")
    for d in dtypes:
        for p in paths[1:]:  # each path against the first
            ratio(f"{d} prefill {p} / {paths[0]}", ("shortrt", d, p), ("shortrt", d, paths[0]))
            ratio(f"{d} decode {p} / {paths[0]}", ("shortrt", d, p), ("shortrt", d, paths[0]),
                  key="decode_tok_s", target=1.0)
    for p in paths:
        ratio(f"int8 / fp32 prefill on {p}", ("shortrt", "int8", p), ("shortrt", "fp32", p), target=2.0)
        for d in dtypes:
            ratio(f"shortrt {d} {p} / transformers fp32 prefill", ("shortrt", d, p), ("transformers", "fp32", None),
                  target=1.2)
    for d in dtypes:
        for b in batches[1:]:
            for p in paths[1:]:
                v = steps[(d, paths[0], b)] / steps[(d, p, b)]
                ratios.append(dict(name=f"{d} step b={b} {p} speed-up over {paths[0]}", value=v, target=None))
                lines.append(f"- {d} step at b={b}: {p} {v:.2f}x faster than {paths[0]}")
    md = "\n".join(lines)
    print(md)
    result = dict(benchmark="kernel_paths", command=command,
                  machine=mach, args=harness.shown_args(a, path_keys=("json", "md")), rows=rows,
                  steps=[dict(dtype=d, path=p, batch=b, ms_per_step=v) for (d, p, b), v in steps.items()],
                  ratios=ratios)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if a.md:
        a.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
