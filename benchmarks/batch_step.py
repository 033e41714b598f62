"""Milliseconds per engine step with b sequences decoding at once, per kernel path.

One engine (max_batch 16) on the default model; for each b, b requests of a
16-token prompt (max_new_tokens 200, no stop token) are submitted and stepped
through their prefill, then `--steps` decode steps are timed one by one. The
kernel paths take turns on the same engine (_C.set_kernels switches the active
table; the packed weights are the same on every path) over `--rounds` rounds,
so drift on a shared machine hits them alike; medians over all timed steps.

    python benchmarks/batch_step.py                         # int8, 2 threads, b = 1 2 4 8 16
    python benchmarks/batch_step.py --dtype fp32 --json benchmarks/results/batch_step.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import shortrt
from shortrt import _C

PROMPT_TOKENS = 16


def time_steps(eng, batch: int, steps: int, prefill_steps: int) -> list[float]:
    ids = [eng.submit([(17 * r + 5 * i) % 1000 + 10 for i in range(PROMPT_TOKENS)], max_new_tokens=200, stop=[])
           for r in range(batch)]
    for _ in range(prefill_steps):
        eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    for i in ids:
        eng.cancel(i)
    while eng.has_work:
        eng.step()
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--paths", default=",".join(p for p in _C.kernel_paths() if p != "ref"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    batches, paths = [int(b) for b in args.batches.split(",")], args.paths.split(",")

    eng = shortrt.Engine(shortrt.load(args.model), dtype=args.dtype, threads=args.threads, max_batch=max(batches))
    before = _C.kernel_active()
    samples = {(p, b): [] for p in paths for b in batches}
    try:
        for _ in range(args.rounds):
            for b in batches:
                for p in paths:
                    _C.set_kernels(p)
                    samples[(p, b)] += time_steps(eng, b, args.steps, args.prefill_steps)
    finally:
        _C.set_kernels(before)

    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    print(f"{args.model} {args.dtype}, {args.threads} threads: ms per decode step (median of "
          f"{args.rounds} x {args.steps}); x = aggregate tokens/s over batch 1")
    print(f"{'batch':>5}" + "".join(f"{p + ' ms':>12}{'x b1':>7}" for p in paths))
    for b in batches:
        print(f"{b:>5}" + "".join(f"{ms[(p, b)]:>12.2f}{b * ms[(p, batches[0])] / ms[(p, b)]:>7.2f}" for p in paths))
    if args.json:
        rows = [dict(path=p, batch=b, ms_per_step=ms[(p, b)]) for p in paths for b in batches]
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, dtype=args.dtype, threads=args.threads, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
