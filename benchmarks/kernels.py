"""The runtime's matmul kernels against this machine's memory bandwidth, llm.c dev/cpu style.

Every variant (kernel path x weight type) is first checked against the scalar
reference on a small problem of the model's shapes, then timed in C++ (GIL
released, so no Python overhead enters a number):

  read bandwidth   summing a 512 MB buffer, 1 and N threads: the ceiling for decode,
                   in 4 KB pages and in transparent 2 MB pages (fewer page walks);
  parallel_for     dispatch + join of the thread pool (a decode step makes ~120 calls);
  decode           every matrix of the model once (30 layers x q|k|v, o, gate|up,
                   down, plus the lm_head), one token, each matrix its own buffer
                   so nothing is still cached: GB/s, % of read bandwidth (same page
                   size), and the matmul-only tokens/s (an upper bound for the
                   engine's decode);
  batched decode   every matrix of the model once with b = 1, 2, 4, 8, 16 tokens (the
                   rows of one engine step with b sequences decoding): ms per step and
                   the aggregate speed-up over b = 1, per path side by side;
  prefill          one layer's matrices on 512 tokens: GFLOP/s and the matmul-only
                   prefill tokens/s it implies for the whole model;
  attention        prefill attention of 512 tokens (every layer's, 9 q / 3 kv heads of
                   64) on each path: the tiled kernel the engine runs (attend_tile) and
                   the two-matmuls-per-kv-head path beside it, interleaved.

Medians over iterations; the machine may be shared, so compare ratios within
one run rather than absolute numbers across runs. The cpu column is the share
of the requested cores the process actually got (process CPU time / wall time
/ threads): well below 100% means other work competed and the row understates
the kernel; the per-cpu-second rate beside it is what the kernel did on the
cores it had (spinning threads count as busy, so it is a lower bound).

    python benchmarks/kernels.py                    # about a minute
    python benchmarks/kernels.py --quick            # a few seconds (fewer layers, iterations)
    python benchmarks/kernels.py --json benchmarks/results/kernels.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

from shortrt import _C

# SmolLM2-135M (the packaged default model): Llama, 30 layers, hidden 576,
# 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152, tied lm_head.
MODEL = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152)
BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "q8": 36 / 32, "q4": 20 / 32}  # (every shape here is whole 16-row q4 groups)
# Project targets (tokens/s), from the llama.cpp baselines on this machine class.
DECODE_TARGET = {"f32": 44.0, "bf16": 66.0, "q8": 100.0, "q4": float("nan")}
PREFILL_TARGET = 470.0  # fp32, 512-token prompt


def layer_shapes(m: dict) -> list[tuple[int, int]]:
    """[rows, cols] of one decoder layer's matrices, q|k|v and gate|up fused as the engine runs them."""
    qkv_rows = (m["heads"] + 2 * m["kv_heads"]) * m["head_dim"]
    return [
        (qkv_rows, m["hidden"]),
        (m["hidden"], m["heads"] * m["head_dim"]),
        (2 * m["intermediate"], m["hidden"]),
        (m["hidden"], m["intermediate"]),
    ]


def weights_bytes(shapes, wtype):
    return sum(r * c for r, c in shapes) * BYTES_PER_WEIGHT[wtype]


def check_against_reference(path: str, wtype: str, shapes, rng) -> float:
    """Max error of the variant vs the reference on 3 tokens, relative to sum|w x|; raises above 1e-5
    (above 2^-8 for bf16 weights on avx512bf16, whose activations are rounded to bf16: 2^-9 each)."""
    worst = 0.0
    for rows, cols in shapes:
        rows = min(rows, 200)  # the scalar reference is slow; a slice of each shape suffices
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        x = rng.standard_normal((3, cols)).astype(np.float32)
        ref = _C.kernel_matmul(w, x, wtype, "ref")
        got = _C.kernel_matmul(w, x, wtype, path, threads=2)
        scale = np.abs(x) @ np.abs(w).T
        worst = max(worst, float(np.max(np.abs(got - ref) / scale)))
    limit = 2.0**-8 if (path, wtype) == ("avx512bf16", "bf16") else 1e-5
    if worst > limit:
        raise SystemExit(f"{path}/{wtype}: differs from the reference by {worst:.2e} of sum|w x| (limit {limit:.1e})")
    return worst


def median(xs):
    return statistics.median(xs)


def timed(fn, *args, threads):
    """(median wall seconds per iteration, cpu share, median cpu seconds per iteration).

    cpu share is the part of `threads` cores the process got while it ran, below
    100% when other work competes for the machine; rates per cpu-second then
    tell what the kernel does on the cores it actually had."""
    t = fn(*args)
    return median(t["wall"]), sum(t["cpu"]) / (sum(t["wall"]) * threads), median(t["cpu"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--paths", default=",".join(p for p in _C.kernel_paths() if p != "ref") or "ref",
                    help="kernel paths to time (default: the fast ones this CPU has)")
    ap.add_argument("--wtypes", default="f32,bf16,q8,q4")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,2,4,8,16", help="token counts of the batched-decode rows")
    ap.add_argument("--pages", help="weight memory: 4K pages, 2M (transparent huge pages), or 4K,2M (default)")
    ap.add_argument("--quick", action="store_true", help="6 layers, 3 iterations, 128-token prefill, 4K pages")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    model = dict(MODEL)
    iters, prefill_tokens = args.iters, args.prefill_tokens
    if args.quick:
        model["layers"], iters, prefill_tokens = 6, 3, 128
    threads = [int(t) for t in args.threads.split(",")]
    paths, wtypes = args.paths.split(","), args.wtypes.split(",")
    page_modes = (args.pages or ("4K" if args.quick else "4K,2M")).split(",")
    if not page_modes or set(page_modes) - {"4K", "2M"}:
        ap.error(f"--pages takes 4K and/or 2M, not {args.pages}")
    layer = layer_shapes(model)
    decode_shapes = layer * model["layers"] + [(model["vocab"], model["hidden"])]
    layer_flops = 2 * sum(r * c for r, c in layer)
    rng = np.random.default_rng(0)
    results = {"machine": platform.processor() or platform.machine(), "model": model, "rows": []}

    print(f"kernel paths on this CPU: {_C.kernel_paths()}; timing {paths}; {iters} iterations, medians\n")
    read_gbs = {}
    for pages in page_modes:
        for t in threads:
            secs, cpu, cpu_secs = timed(_C.bench_read_bandwidth, 512.0, paths[0], t, iters, pages == "2M", threads=t)
            read_gbs[(pages, t)] = 512e6 / secs / 1e9
            print(f"read bandwidth  {pages:>2} pages {t} thread(s): {read_gbs[(pages, t)]:6.1f} GB/s"
                  f"   ({512e6 / cpu_secs / 1e9:.1f} GB per cpu-s, cpu {100 * cpu:.0f}%)")
    results["read_gbs"] = {f"{p}/{t}": v for (p, t), v in read_gbs.items()}
    for t in threads:
        secs, cpu, _ = timed(_C.bench_parallel_for, t, 2 * t, 1000, iters, threads=t)
        results.setdefault("parallel_for_us", {})[t] = secs / 1000 * 1e6
        print(f"parallel_for   {t} thread(s): {secs / 1000 * 1e6:6.2f} us per call of {2 * t} items   (cpu {100 * cpu:.0f}%)")

    print(f"\ndecode: {model['layers']} layers x {len(layer)} matrices + lm_head, 1 token")
    print(f"{'variant':<12}{'pages':>6}{'thr':>4}{'check':>10}{'ms/tok':>9}{'GB/s':>8}{'% read':>8}{'tok/s':>8}"
          f"{'target':>8}{'cpu':>6}{'GB/cpu-s':>10}")
    for path in paths:
        for wtype in wtypes:
            check = check_against_reference(path, wtype, layer + [(1000, model["hidden"])], rng)
            nbytes = weights_bytes(decode_shapes, wtype)
            for pages in page_modes:
                for t in threads:
                    secs, cpu, cpu_secs = timed(_C.bench_matmuls, decode_shapes, wtype, path, t, 1, iters, pages == "2M",
                                                threads=t)
                    gbs = nbytes / secs / 1e9
                    read = read_gbs[(pages, t)]
                    results["rows"].append(dict(kind="decode", path=path, wtype=wtype, pages=pages, threads=t,
                                                seconds=secs, gbs=gbs, read_fraction=gbs / read, tokens_per_s=1 / secs,
                                                cpu_share=cpu, gb_per_cpu_s=nbytes / cpu_secs / 1e9,
                                                max_rel_error=check))
                    target = DECODE_TARGET[wtype] if model["layers"] == MODEL["layers"] else float("nan")
                    print(f"{path + '/' + wtype:<12}{pages:>6}{t:>4}{check:>10.1e}{secs * 1e3:>9.2f}{gbs:>8.1f}"
                          f"{100 * gbs / read:>7.0f}%{1 / secs:>8.1f}{target:>8.0f}{100 * cpu:>5.0f}%"
                          f"{nbytes / cpu_secs / 1e9:>10.1f}")

    batches = [int(b) for b in args.batches.split(",")]
    t = threads[-1]
    print(f"\nbatched decode: {model['layers']} layers x {len(layer)} matrices + lm_head, b tokens, {t} thread(s), "
          f"{page_modes[-1]} pages; x = aggregate speed-up over b = {batches[0]}")
    print(f"{'wtype':<6}{'b':>4}" + "".join(f"{p + ' ms':>13}{'x':>6}" for p in paths))
    for wtype in wtypes:
        secs = {}
        for b in batches:
            for path in paths:  # side by side: the paths take turns at each b
                secs[(path, b)], cpu, _ = timed(_C.bench_matmuls, decode_shapes, wtype, path, t, b, iters,
                                                page_modes[-1] == "2M", threads=t)
                results["rows"].append(dict(kind="batched_decode", path=path, wtype=wtype, pages=page_modes[-1],
                                            threads=t, tokens=b, seconds=secs[(path, b)], cpu_share=cpu))
            print(f"{wtype:<6}{b:>4}" + "".join(
                f"{secs[(p, b)] * 1e3:>13.2f}{b * secs[(p, batches[0])] / secs[(p, b)]:>6.2f}" for p in paths))

    print(f"\nprefill: one layer's matrices on {prefill_tokens} tokens")
    print(f"{'variant':<12}{'thr':>4}{'ms/layer':>10}{'GFLOP/s':>9}{'model tok/s':>13}{'target':>8}{'cpu':>6}"
          f"{'GFLOP/cpu-s':>13}")
    for path in paths:
        for wtype in wtypes:
            for t in threads:
                secs, cpu, cpu_secs = timed(_C.bench_matmuls, layer, wtype, path, t, prefill_tokens, max(3, iters // 2),
                                            threads=t)
                gflops = layer_flops * prefill_tokens / secs / 1e9
                tok_s = prefill_tokens / (secs * model["layers"])
                row = dict(kind="prefill", path=path, wtype=wtype, threads=t, tokens=prefill_tokens, seconds=secs,
                           cpu_share=cpu, gflops=gflops, gflop_per_cpu_s=layer_flops * prefill_tokens / cpu_secs / 1e9,
                           model_tokens_per_s=tok_s)
                results["rows"].append(row)
                target = f"{PREFILL_TARGET:.0f}" if wtype == "f32" else ""
                print(f"{path + '/' + wtype:<12}{t:>4}{secs * 1e3:>10.2f}{gflops:>9.1f}{tok_s:>13.0f}{target:>8}"
                      f"{100 * cpu:>5.0f}%{layer_flops * prefill_tokens / cpu_secs / 1e9:>13.1f}")

    print(f"\nprefill attention: {prefill_tokens} tokens x {model['layers']} layers, {t} thread(s); "
          "tiles = attend_tile (the engine's), matmuls = two matmuls per kv head")
    print(f"{'path':<8}{'tiles ms':>10}{'matmuls ms':>12}{'tiles x':>9}{'max diff':>10}")
    n_heads, n_kv, hd = model["heads"], model["kv_heads"], model["head_dim"]
    q = rng.standard_normal((prefill_tokens, n_heads, hd)).astype(np.float32)
    kv = [rng.standard_normal((prefill_tokens, n_kv * hd)).astype(np.float32) for _ in range(2)]
    for path in paths:
        diff = float(np.abs(_C.attention_prefill(q, *kv, n_kv, path)
                            - _C.attention_prefill(q, *kv, n_kv, path, matmuls=True)).max())
        times = {True: [], False: []}
        for _ in range(iters):  # the two take turns
            for matmuls in (False, True):
                start = time.perf_counter()
                _C.attention_prefill(q, *kv, n_kv, path, threads=t, matmuls=matmuls, repeat=model["layers"])
                times[matmuls].append(time.perf_counter() - start)
        tiles_s, matmuls_s = median(times[False]), median(times[True])
        results["rows"].append(dict(kind="prefill_attention", path=path, threads=t, tokens=prefill_tokens,
                                    tiles_seconds=tiles_s, matmuls_seconds=matmuls_s, max_abs_diff=diff))
        print(f"{path:<8}{tiles_s * 1e3:>10.1f}{matmuls_s * 1e3:>12.1f}{matmuls_s / tiles_s:>9.2f}{diff:>10.1e}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
