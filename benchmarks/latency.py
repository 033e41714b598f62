"""Layer removal as latency and memory saved, side by side with the engines users would pick instead.

For a model and a list of removal counts (pruned checkpoints made with
`shortgpt` on the fly and cached), and for each engine available — shortrt
fp32/bf16/int8/int4 (`shortrt-int4` with the LM head in int4 too; `shortrt-int4:int8` with it in
int8, the engine's default), transformers fp32/bf16, llama.cpp (the --llamacpp-types formats, default
F32/F16/Q8_0/Q4_0, made by its quantize API from the default model's Q4_1 file or from an F32 GGUF
shortrt exports, pruned by shortrt.gguf_export.prune_gguf, when llama-cpp-python is installed;
with an existing llama.cpp build, `CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install
llama-cpp-python diskcache` skips the source build and LLAMA_CPP_LIB_PATH=<build>/bin points it at
the libraries) — it measures, each engine in its own process
(benchmarks/harness.py; a worker that crashes or hangs becomes a failed row and the run goes on):

  time to first token and prefill tokens/s for a 512-token prompt,
  decode tokens/s and per-token latency p50/p90 for 128 new tokens,
  weight bytes, KV-cache bytes at 2048 tokens of context, peak resident memory.

Rounds interleave the engines so drift hits all alike; medians over rounds are
reported; every row carries the memory-bandwidth bound (bytes read per decoded
token / bandwidth measured here), and pruned rows compare their measured
speedup with the ideal ratio of bytes read per token. At 8 removed it also runs
the variants that keep more of the model: `attention` (8 attention sublayers
removed), `span+layer` and `span+mlp` (the span replaced by a module trained by
shortrt.replace; trained once and cached, ~3 min each on 2 cores).

    python benchmarks/latency.py --quick              # a couple of minutes (no replacement training)
    python benchmarks/latency.py --json benchmarks/results/latency.json --png benchmarks/results/latency.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import harness
from harness import CONTEXT, fmt_mib, shown_path

HERE = Path(__file__).resolve().parent
DEFAULT_ENGINES = ("shortrt-fp32,shortrt-bf16,shortrt-int8,shortrt-int4,shortrt-int4:int8,transformers-fp32,"
                   "transformers-bf16,llama.cpp")


def pruned_checkpoints(model_name: str, needed: list[tuple[str, int]], scores_file: str | None,
                       calib_tokens: int) -> dict:
    """{(variant, k): checkpoint dir}; made once with the given method and cached under $SHORTRT_CACHE."""
    import shortrt
    from shortrt.checkpoint import cache_dir

    model = shortrt.load(model_name)
    base = cache_dir() / "bench" / model.path.name
    base.mkdir(parents=True, exist_ok=True)
    scores_path = Path(scores_file) if scores_file else base / f"scores-{calib_tokens}.json"
    out = {}
    variants = sorted({v for v, _ in needed})
    needed = [(v, k) for v, k in needed if k > 0]
    if any(not (base / f"{v}-p{k}" / "config.json").exists() for v, k in needed):
        if scores_path.exists():
            scores = shortrt.Scores.load(scores_path)
        else:
            scores = shortrt.calibrate(model, n_tokens=calib_tokens)
            scores.save(scores_path)
    for variant, k in needed:
        d = base / f"{variant}-p{k}"
        if not (d / "config.json").exists():
            method, _, replace_kind = variant.partition("+")
            lmap = shortrt.select(scores, remove=k, method=method)
            if replace_kind:
                shortrt.replace(model, lmap, d, kind=replace_kind, overwrite=True)
            else:
                shortrt.prune(model, lmap, d, overwrite=True)
        out[(variant, k)] = str(d)
    for variant in variants:
        out[(variant, 0)] = str(model.path)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="a model source shortrt.load takes, or synthetic:SHAPE for a random-weight checkpoint "
                        "of a published shape (benchmarks/scale.py SHAPES, e.g. synthetic:qwen2.5-0.5b; speed "
                        "and memory only) (default %(default)s)")
    p.add_argument("--llamacpp-types", default=",".join(harness.LLAMACPP_TYPES),
                   help="llama.cpp formats to run (of %s; default %%(default)s)" % ", ".join(harness.LLAMACPP_FTYPES))
    p.add_argument("--remove", default="0,4,8,12", help="layer counts to remove (default %(default)s)")
    p.add_argument("--variants", default="shortgpt",
                   help="pruning variants run at every --remove count: shortgpt, span, attention, "
                        "span+layer, span+mlp (default %(default)s)")
    p.add_argument("--extra-variants", default="attention,span+layer,span+mlp",
                   help="variants run only at --extra-remove (default %(default)s; the span+ ones train a "
                        "replacement, ~3 min each, the first time; '' for none)")
    p.add_argument("--extra-remove", default="8", help="counts for --extra-variants (default %(default)s)")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"),
                   help="calibration scores to select layers with (default: the committed ones; "
                        "calibrated on the fly when the file is missing)")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help="comma list (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    harness.add_run_options(p)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="0 and 8 removed, fewer engines and tokens, one round")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--png", help="write the chart here")
    args = p.parse_args(argv)
    if args.quick:
        args.remove, args.rounds, args.new_tokens, args.prompt_tokens = "0,8", 1, 32, 128
        if args.engines == p.get_default("engines"):
            args.engines = "shortrt-fp32,shortrt-int8,transformers-fp32"
        if args.extra_variants == p.get_default("extra_variants"):
            args.extra_variants = ""  # no replacement training in a smoke run
    return args


def make_jobs(engines: list[str], ckpts: dict, dense_variant: str, model: str = "default",
              llamacpp_types=harness.LLAMACPP_TYPES) -> list[dict]:
    """One job per engine configuration and checkpoint, dense first."""
    ordered = [(vk, path) for vk, path in sorted(ckpts.items(), key=lambda kv: (kv[0][1], kv[0][0]))
               if vk[1] or vk[0] == dense_variant]  # the dense checkpoint once, not once per variant
    jobs = []
    for engine in engines:
        if engine == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed; its rows are skipped "
                      "(pip install llama-cpp-python, ~18 min source build)", file=sys.stderr)
                continue
            ggufs = harness.llamacpp_ggufs(llamacpp_types, harness.llamacpp_source(model))
            for t, gguf in ggufs.items():
                for (variant, k), ckpt in ordered:
                    path = harness.pruned_gguf(gguf, ckpt) if k else gguf
                    if path is None:
                        continue  # attention-less or replaced layers have no GGUF form
                    jobs.append({"label": f"llama.cpp {t}", "engine": "llama.cpp", "dtype": t, "path": str(path),
                                 "variant": variant if k else "dense", "removed": k})
            continue
        name, _, dtype = engine.partition("-")
        dtype, _, lm_head = dtype.partition(":")  # shortrt-int4:int8 = int4 layers, int8 LM head
        label = f"{name} {dtype}" + (f" (head {lm_head})" if lm_head else "")
        for (variant, k), path in ordered:
            if name == "transformers" and any(x in variant for x in ("attention", "mlp")) and k:
                continue  # transformers cannot load attention-less layers
            job = {"label": label, "engine": name, "dtype": dtype, "path": path,
                   "variant": variant if k else "dense", "removed": k}
            if lm_head:
                job["lm_head_dtype"] = lm_head
            jobs.append(job)
    return jobs


def main(argv=None) -> None:
    args = parse_args(argv)
    counts = sorted({int(x) for x in args.remove.split(",")})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    extra = [v.strip() for v in args.extra_variants.split(",") if v.strip()]
    needed = [(v, k) for v in variants for k in counts]
    needed += [(v, int(k)) for v in extra for k in args.extra_remove.split(",") if int(k) > 0]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]

    from tqdm.auto import tqdm

    import shortrt
    from shortrt.data import heldout_texts

    model = args.model  # what is loaded; args.model stays as given (the report shows it)
    if model.startswith("synthetic:"):
        import scale
        from shortrt.checkpoint import cache_dir

        shape = model.partition(":")[2]
        if shape not in scale.SHAPES:
            sys.exit(f"--model {model}: unknown shape (known: {', '.join(scale.SHAPES)})")
        model = str(scale.synthetic_checkpoint(shape, cache_dir() / "bench" / f"synthetic-{shape}"))
    dense = shortrt.load(model)
    print(f"model {dense} — measuring memory bandwidth ({args.threads} threads)...", file=sys.stderr)
    bandwidth = harness.measure_bandwidth(args.threads)
    ckpts = pruned_checkpoints(model, needed, args.scores, args.calib_tokens)
    types = [t.strip() for t in args.llamacpp_types.split(",") if t.strip()]
    jobs = make_jobs(engines, ckpts, variants[0], model, types)

    common = {"threads": args.threads, "context": CONTEXT, "reps": 1, "new_tokens": args.new_tokens,
              "decode_prompt_tokens": 16, "prompt": harness.prompt_ids(dense.path, args.prompt_tokens, heldout_texts())}
    with tqdm(total=len(jobs) * args.rounds, desc="benchmark", unit="run", file=sys.stderr) as bar:
        def progress(i, job, result):
            if "failed" in result:
                tqdm.write(f"{job['label']} {job['variant']} -{job['removed']}: FAILED ({result['failed']})",
                           file=sys.stderr)
                bar.update(args.rounds - i)  # its later rounds are not run
            else:
                bar.update(1)

        samples = harness.run_jobs(jobs, common, args.rounds, args.worker_timeout, progress)

    rows = [harness.merge_rounds(job, runs) for job, runs in zip(jobs, samples)]
    for row in rows:
        if "failed" not in row:
            row["bound_tok_s"] = bandwidth / row["bytes_per_token"]
    # Pruned vs dense of the same engine: measured speedup against the ideal ratio of bytes per token.
    for row in rows:
        base = next((r for r in rows if r["label"] == row["label"] and r["removed"] == 0 and "failed" not in r), None)
        if base and row["removed"] and "failed" not in row:
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["ideal_speedup"] = base["bytes_per_token"] / row["bytes_per_token"]
            row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"]
        row["path"] = shown_path(row["path"])

    md = render_markdown(rows, bandwidth, args, dense)
    print(md)
    result = {"machine": harness.machine(), "bandwidth_bytes_s": bandwidth, "args": harness.shown_args(args),
              "rows": rows}
    harness.save_report(args, result, md, rows, plot)


def render_markdown(rows, bandwidth, args, dense) -> str:
    lines = [
        f"Model `{args.model if args.model.startswith('synthetic:') else dense.name}`, batch 1, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, medians of {args.rounds} interleaved rounds. "
        f"Measured read bandwidth {bandwidth / 1e9:.1f} GB/s; bound = bandwidth / bytes read per token.",
        "",
        "| engine | variant | removed | layers | decode tok/s | bound tok/s | of bound | p50 ms | p90 ms | TTFT ms | prefill tok/s | weights | KV @2048 | peak RSS | speedup vs dense (ideal) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | {r['variant']} | {r['removed']} | - | FAILED: {r['failed']} |"
                         + " - |" * 10)
            continue
        sp = f"{r['speedup']:.2f}× ({r['ideal_speedup']:.2f}×)" if "speedup" in r else "-"
        lines.append(
            f"| {r['label']} | {r['variant']} | {r['removed']} | {round(r['layers_run']) if r.get('layers_run') else '-'} | "
            f"{r['decode_tok_s']:.1f} | {r['bound_tok_s']:.1f} | {r['decode_tok_s'] / r['bound_tok_s']:.0%} | "
            f"{r['token_ms_p50']:.1f} | {r['token_ms_p90']:.1f} | {1e3 * r['ttft_s']:.0f} | {r['prefill_tok_s']:.0f} | "
            f"{fmt_mib(r['weight_bytes'], 0, ' MiB')} | {fmt_mib(r['kv_bytes'], 0, ' MiB')} | {fmt_mib(r['peak_rss_bytes'], 0, ' MiB')} | {sp} |"
        )
    failed = harness.failures(rows)
    if failed:
        lines += ["", "Failed workers (their rows above hold no numbers):", "", "```", *failed, "```"]
    lines += ["", "Ratios measured in this run:"]
    by = {(r["label"], r["variant"], r["removed"]): r for r in rows if "failed" not in r}

    def ratio(a, b, what="decode_tok_s"):
        ra, rb = by.get(a), by.get(b)
        return f"{ra[what] / rb[what]:.2f}×" if ra and rb else "n/a"

    for ours, theirs in [("shortrt fp32", "llama.cpp F32"), ("shortrt bf16", "llama.cpp F16"),
                         ("shortrt int8", "llama.cpp Q8_0"), ("shortrt int4", "llama.cpp Q4_0"),
                         ("shortrt fp32", "transformers fp32"), ("shortrt bf16", "transformers bf16"),
                         ("shortrt int4", "shortrt fp32"), ("shortrt int4", "shortrt int8"),
                         ("shortrt int4 (head int8)", "shortrt int4")]:
        lines.append(f"- decode {ours} / {theirs}: {ratio((ours, 'dense', 0), (theirs, 'dense', 0))}")
    lines.append(f"- prefill shortrt fp32 / llama.cpp F32: {ratio(('shortrt fp32', 'dense', 0), ('llama.cpp F32', 'dense', 0), 'prefill_tok_s')}; "
                 f"/ transformers fp32: {ratio(('shortrt fp32', 'dense', 0), ('transformers fp32', 'dense', 0), 'prefill_tok_s')}")
    lines += ["", "Issue #13's targets, in this run:", *target_lines(by)]
    for r in rows:
        if "speedup" in r:
            gap = r["speedup"] / r["ideal_speedup"]
            note = "" if 0.9 <= gap <= 1.1 else (
                " — below the ideal: fixed per-token costs (lm_head, sampling, Python) dominate more" if gap < 0.9
                else " — above the ideal: the smaller working set fits caches better")
            lines.append(f"- {r['label']} {r['variant']} -{r['removed']}: decode {r['speedup']:.2f}× dense, "
                         f"ideal {r['ideal_speedup']:.2f}× by bytes per token; KV cache {r['kv_ratio']:.3f} of dense{note}")
    return "\n".join(lines)


MATCHING_LLAMACPP = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}
BOUND_TARGETS = {"fp32": 0.90, "int8": 0.85, "int4": 0.85}


def target_lines(by: dict) -> list[str]:
    """Each of issue #13's speed targets that this run's rows can decide: measured, target, met or MISSED."""
    out = []

    def check(what: str, value: float | None, target: float, unit: str = "×") -> None:
        if value is None:
            return
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}×"
        goal = f"{target:.0%}" if unit == "%" else f"{target:.2f}×"
        out.append(f"- {what}: {shown} (target ≥ {goal}: {'met' if value >= target else 'MISSED'})")

    def get(label, key, variant="dense", removed=0):
        r = by.get((label, variant, removed))
        return r[key] if r else None

    def ratio(a, b, key="decode_tok_s"):
        return a / b if a and b else None

    int4_labels = [label for label in ("shortrt int4 (head int8)", "shortrt int4")
                   if (label, "dense", 0) in by]
    for label in int4_labels:
        q4 = get("llama.cpp Q4_0", "decode_tok_s")
        check(f"decode {label} dense / llama.cpp Q4_0 dense", ratio(get(label, "decode_tok_s"), q4), 1.3)
        check(f"decode {label} -8 layers / llama.cpp Q4_0 dense",
              ratio(get(label, "decode_tok_s", "shortgpt", 8), q4), 1.6)
    for dtype, theirs in MATCHING_LLAMACPP.items():
        labels = int4_labels if dtype == "int4" else [f"shortrt {dtype}"]
        for label in labels:
            ours = by.get((label, "dense", 0))
            if not ours:
                continue
            check(f"decode {label} / llama.cpp {theirs}",
                  ratio(ours["decode_tok_s"], get(f"llama.cpp {theirs}", "decode_tok_s")), 1.1)
            peers = [p for p in (get(f"llama.cpp {theirs}", "prefill_tok_s"),
                                 get("transformers fp32", "prefill_tok_s")) if p]
            if peers:
                check(f"prefill {label} / the faster of llama.cpp {theirs} and transformers fp32 ({max(peers):.0f} tok/s)",
                      ours["prefill_tok_s"] / max(peers), 1.2)
            if dtype in BOUND_TARGETS:
                check(f"decode {label} of its bandwidth bound", ours["decode_tok_s"] / ours["bound_tok_s"],
                      BOUND_TARGETS[dtype], "%")
    check("prefill shortrt int8 / shortrt fp32",
          ratio(get("shortrt int8", "prefill_tok_s"), get("shortrt fp32", "prefill_tok_s")), 2.0)
    return out or ["- (none of the rows the targets compare were measured)"]


VARIANT_MARKERS = {"attention": "s", "span": "v", "span+layer": "^", "span+mlp": "D"}


def plot(rows, path) -> None:
    """Decode speed and peak memory against layers removed: one colour per engine, a line through
    its dense and shortgpt rows, and one marker shape per other variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        line = sorted((r for r in mine if r["variant"] in ("dense", "shortgpt")), key=lambda r: r["removed"])
        for ax, key, scale in ((ax1, "decode_tok_s", 1), (ax2, "peak_rss_bytes", 2**-20)):
            ax.plot([r["removed"] for r in line], [r[key] * scale for r in line], marker="o", color=colors[label])
            for r in mine:
                if r["variant"] not in ("dense", "shortgpt"):
                    ax.plot([r["removed"]], [r[key] * scale], linestyle="none", color=colors[label],
                             marker=VARIANT_MARKERS.get(r["variant"], "x"), markersize=7, markeredgecolor="black",
                             markeredgewidth=0.5)
    ax1.set(xlabel="layers removed", ylabel="decode tokens/s (batch 1)", title="Decode speed")
    ax2.set(xlabel="layers removed", ylabel="peak resident memory (MiB)", title="Memory")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] not in ("dense", "shortgpt")))
    handles = [Line2D([], [], color=colors[label], marker="o", label=label) for label in labels]
    handles += [Line2D([], [], color="grey", linestyle="none", marker=VARIANT_MARKERS.get(v, "x"),
                       markeredgecolor="black", markeredgewidth=0.5, label=v) for v in variants]
    ax1.legend(handles=handles, fontsize=7, title="engine (line: shortgpt) / variant", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
