"""Layer removal as latency and memory saved, side by side with the engines users would pick instead.

For a model and a list of removal counts (pruned checkpoints made with
`shortgpt` on the fly and cached), and for each engine available — shortrt
fp32/bf16/int8, transformers fp32/bf16, llama.cpp (F32/F16/Q8_0 GGUFs made by its quantize API,
pruned by shortrt.gguf_prune, when llama-cpp-python is installed) — it measures, each engine in its own process:

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
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTEXT = 2048


# ----------------------------------------------------------------------------- workers
# A worker runs one engine configuration in a fresh process and prints one JSON line.

def _prompt_ids(tokenizer_dir: str, n: int) -> list[int]:
    from tokenizers import Tokenizer

    from shortrt.data import heldout_texts

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    ids: list[int] = []
    for text in heldout_texts():
        ids += tok.encode(text).ids
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SystemExit(f"held-out text gives only {len(ids)} tokens, {n} needed")
    return ids[:n]


def _timings(stamps: list[float], t_start: float) -> dict:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    gaps_sorted = sorted(gaps)
    return {
        "ttft_s": stamps[0] - t_start,
        "decode_tok_s": len(gaps) / (stamps[-1] - stamps[0]),
        "token_ms_p50": 1e3 * statistics.median(gaps),
        "token_ms_p90": 1e3 * gaps_sorted[int(0.9 * (len(gaps_sorted) - 1))],
    }


def _measure(run, prompt: list[int], short: list[int], new_tokens: int) -> dict:
    """The protocol every engine follows. run(ids, n_new) -> (t0, per-token timestamps).
    A warm-up, then one new token after the long prompt (prefill), then new_tokens after the
    short prompt (decode)."""
    run(short[:8], 8)
    t0, stamps = run(prompt, 1)
    prefill_s = stamps[0] - t0
    t0, stamps = run(short, new_tokens)
    return {**_timings(stamps, t0), "prefill_tok_s": len(prompt) / prefill_s}


def worker_shortrt(args) -> dict:
    import shortrt

    eng = shortrt.Engine(args.model, dtype=args.dtype, threads=args.threads, max_seq=CONTEXT)
    prompt = _prompt_ids(args.model, args.prompt_tokens)
    short = prompt[: args.decode_prompt_tokens]

    def run(ids, n_new):
        stamps = []
        t0 = time.perf_counter()
        eng.generate_ids(ids, max_new_tokens=n_new, stop=[],
                         callback=lambda _seq, _tok: stamps.append(time.perf_counter()) or True)
        return t0, stamps

    out = _measure(run, prompt, short, args.new_tokens)  # its warm-up pages in weights, spins up the pool
    out.update(
        weight_bytes=eng.weight_bytes,
        bytes_per_token=eng.weight_bytes_per_token,
        kv_bytes=eng.kv_cache_bytes,  # allocated for max_seq = CONTEXT tokens
        layers_run=eng.num_layers,
    )
    return out


def worker_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    prompt = _prompt_ids(args.model, args.prompt_tokens)
    short = prompt[: args.decode_prompt_tokens]

    @torch.inference_mode()
    def run(ids, n_new):
        stamps = []
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        stamps.append(time.perf_counter())
        for _ in range(n_new - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            stamps.append(time.perf_counter())
        return t0, stamps

    out = _measure(run, prompt, short, args.new_tokens)
    cfg = model.config
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.tensor([], dtype=dtype).element_size()
    out.update(
        weight_bytes=n_bytes,
        bytes_per_token=n_bytes,
        kv_bytes=2 * cfg.num_hidden_layers * CONTEXT * kv_heads * head_dim * elem,
        layers_run=cfg.num_hidden_layers,
    )
    return out


def worker_llamacpp(args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=CONTEXT, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    prompt = _prompt_ids(args.tokenizer, args.prompt_tokens)
    short = prompt[: args.decode_prompt_tokens]

    def run(ids, n_new):
        llm.reset()
        stamps = []
        t0 = time.perf_counter()
        for i, _tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
            stamps.append(time.perf_counter())
            if i + 1 >= n_new:
                break
        return t0, stamps

    out = _measure(run, prompt, short, args.new_tokens)
    from gguf import GGUFReader

    reader = GGUFReader(args.model)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_layers = int(llm.metadata.get("llama.block_count", 0)) or None
    kv_heads = int(llm.metadata.get("llama.attention.head_count_kv", 0))
    emb = int(llm.metadata.get("llama.embedding_length", 0))
    heads = int(llm.metadata.get("llama.attention.head_count", 1))
    out.update(
        weight_bytes=n_bytes,
        bytes_per_token=n_bytes,
        kv_bytes=2 * (n_layers or 0) * CONTEXT * kv_heads * (emb // heads) * 2,  # f16 cache
        layers_run=n_layers,
    )
    return out


WORKERS = {"shortrt": worker_shortrt, "transformers": worker_hf, "llama.cpp": worker_llamacpp}


def worker_main(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", required=True, choices=WORKERS)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    result = WORKERS[args.engine](args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver

def measure_bandwidth(threads: int, size_mib: int = 512, reps: int = 9) -> float:
    """Read bandwidth in bytes/s: the best of shortrt's AVX2 sum over a buffer far larger than the
    caches (with 4 KiB and with 2 MiB pages), median time over `reps` passes each. The fastest
    way this machine can stream memory is what bounds decode."""
    import statistics as st

    from shortrt import _C

    best = 0.0
    for huge in (False, True):
        times = _C.bench_read_bandwidth(size_mib, "avx2" if "avx2" in _C.kernel_paths() else "ref",
                                        threads, reps, huge)["wall"]
        best = max(best, size_mib * 2**20 / st.median(times))
    return best


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike getrusage's ru_maxrss it is not
    inherited from the parent across fork/exec, so each worker reports only its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def llamacpp_ggufs(dense_dir: str, types: list[str]) -> dict:
    """F32/F16/Q8_0 GGUFs of the default model, made with llama.cpp's quantize API (cached)."""
    import ctypes

    import llama_cpp

    from shortrt.checkpoint import cache_dir, default_gguf_path

    src = default_gguf_path()
    base = cache_dir() / "bench" / "gguf"
    base.mkdir(parents=True, exist_ok=True)
    ftypes = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
              "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    out = {}
    for t in types:
        dst = base / f"{src.stem.split('.')[0]}-{t}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftypes[t]
            params.allow_requantize = True  # the source is Q4_1: every format holds exactly its dequantized values
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {t} failed ({rc})")
        out[t] = str(dst)
    return out


def pruned_gguf(dense_gguf: str, ckpt_dir: str) -> str | None:
    """The dense GGUF with the layers the pruned checkpoint removed taken out (cached), or None."""
    from shortrt.gguf_prune import prune_gguf

    meta = json.loads((Path(ckpt_dir) / "shortrt.json").read_text())
    layers = meta["layers"]
    if any(e.get("kind", "layer") != "layer" or not e.get("attention", True) or not e.get("mlp", True) for e in layers):
        return None
    dst = Path(ckpt_dir) / (Path(dense_gguf).stem + ".gguf")
    if not dst.exists():
        prune_gguf(dense_gguf, [e["source"] for e in layers], dst)
    return str(dst)


def run_worker(job: dict, common: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", job["engine"], "--model", job["path"],
           "--dtype", job["dtype"], *common]
    if job.get("tokenizer"):
        cmd += ["--tokenizer", job["tokenizer"]]
    env = dict(os.environ, OMP_NUM_THREADS=common[common.index("--threads") + 1])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {job['label']} failed:\n{res.stderr[-3000:]}")


def fmt_bytes(n) -> str:
    return f"{n / 2**20:,.0f} MiB" if n is not None else "-"


def main() -> None:
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker"]
        return worker_main(argv)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
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
    p.add_argument("--engines", default="shortrt-fp32,shortrt-bf16,shortrt-int8,transformers-fp32,transformers-bf16,llama.cpp",
                   help="comma list (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="0 and 8 removed, fewer engines and tokens, one round")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--png", help="write the chart here")
    args = p.parse_args()
    if args.quick:
        args.remove, args.rounds, args.new_tokens, args.prompt_tokens = "0,8", 1, 32, 128
        if args.engines == p.get_default("engines"):
            args.engines = "shortrt-fp32,shortrt-int8,transformers-fp32"
        if args.extra_variants == p.get_default("extra_variants"):
            args.extra_variants = ""  # no replacement training in a smoke run
    counts = sorted({int(x) for x in args.remove.split(",")})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    extra = [v.strip() for v in args.extra_variants.split(",") if v.strip()]
    needed = [(v, k) for v in variants for k in counts]
    needed += [(v, int(k)) for v in extra for k in args.extra_remove.split(",") if int(k) > 0]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]

    from tqdm.auto import tqdm

    import shortrt

    dense = shortrt.load(args.model)
    print(f"model {dense} — measuring memory bandwidth ({args.threads} threads)...", file=sys.stderr)
    bandwidth = measure_bandwidth(args.threads)
    ckpts = pruned_checkpoints(args.model, needed, args.scores, args.calib_tokens)

    jobs = []
    for engine in engines:
        if engine == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed; its rows are skipped "
                      "(pip install llama-cpp-python, ~18 min source build)", file=sys.stderr)
                continue
            for t, path in llamacpp_ggufs(str(dense.path), ["F32", "F16", "Q8_0"]).items():
                for (variant, k), ckpt in sorted(ckpts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                    if k == 0 and variant != variants[0]:
                        continue
                    gguf_path = pruned_gguf(path, ckpt) if k else path
                    if gguf_path is None:
                        continue  # attention-less or replaced layers have no GGUF form
                    jobs.append({"label": f"llama.cpp {t}", "engine": "llama.cpp", "dtype": t, "path": gguf_path,
                                 "tokenizer": str(dense.path), "variant": variant if k else "dense", "removed": k})
            continue
        name, _, dtype = engine.partition("-")
        for (variant, k), path in sorted(ckpts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if k == 0 and variant != variants[0]:
                continue
            if name == "transformers" and any(x in variant for x in ("attention", "mlp")) and k:
                continue  # transformers cannot load attention-less layers
            jobs.append({"label": f"{name} {dtype}", "engine": name, "dtype": dtype, "path": path,
                         "variant": variant if k else "dense", "removed": k})

    common = ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
              "--new-tokens", str(args.new_tokens)]
    samples: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
    with tqdm(total=len(jobs) * args.rounds, desc="benchmark", unit="run", file=sys.stderr) as bar:
        for _ in range(args.rounds):
            for i, job in enumerate(jobs):
                bar.set_postfix_str(f"{job['label']} {job['variant']} -{job['removed']}")
                samples[i].append(run_worker(job, common))
                bar.update(1)

    rows = []
    for i, job in enumerate(jobs):
        runs = samples[i]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
        row = {**job, **med, "rounds": len(runs)}
        row["bound_tok_s"] = bandwidth / row["bytes_per_token"]
        rows.append(row)
    # Pruned vs dense of the same engine: measured speedup against the ideal ratio of bytes per token.
    for row in rows:
        base = next((r for r in rows if r["label"] == row["label"] and r["removed"] == 0), None)
        if base and row["removed"]:
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["ideal_speedup"] = base["bytes_per_token"] / row["bytes_per_token"]
            row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"]

    md = render_markdown(rows, bandwidth, args, dense)
    print(md)
    result = {"machine": machine(), "bandwidth_bytes_s": bandwidth, "args": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(md + "\n")
    if args.png:
        plot(rows, args.png)


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


def render_markdown(rows, bandwidth, args, dense) -> str:
    lines = [
        f"Model `{dense.name}`, batch 1, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, medians of {args.rounds} interleaved rounds. "
        f"Measured read bandwidth {bandwidth / 1e9:.1f} GB/s; bound = bandwidth / bytes read per token.",
        "",
        "| engine | variant | removed | layers | decode tok/s | bound tok/s | of bound | p50 ms | p90 ms | TTFT ms | prefill tok/s | weights | KV @2048 | peak RSS | speedup vs dense (ideal) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sp = f"{r['speedup']:.2f}× ({r['ideal_speedup']:.2f}×)" if "speedup" in r else "-"
        lines.append(
            f"| {r['label']} | {r['variant']} | {r['removed']} | {r.get('layers_run') or '-'} | "
            f"{r['decode_tok_s']:.1f} | {r['bound_tok_s']:.1f} | {r['decode_tok_s'] / r['bound_tok_s']:.0%} | "
            f"{r['token_ms_p50']:.1f} | {r['token_ms_p90']:.1f} | {1e3 * r['ttft_s']:.0f} | {r['prefill_tok_s']:.0f} | "
            f"{fmt_bytes(r['weight_bytes'])} | {fmt_bytes(r['kv_bytes'])} | {fmt_bytes(r['peak_rss_bytes'])} | {sp} |"
        )
    lines += ["", "Ratios measured in this run:"]
    by = {(r["label"], r["variant"], r["removed"]): r for r in rows}

    def ratio(a, b, what="decode_tok_s"):
        ra, rb = by.get(a), by.get(b)
        return f"{ra[what] / rb[what]:.2f}×" if ra and rb else "n/a"

    for ours, theirs in [("shortrt fp32", "llama.cpp F32"), ("shortrt bf16", "llama.cpp F16"),
                         ("shortrt int8", "llama.cpp Q8_0"), ("shortrt fp32", "transformers fp32"),
                         ("shortrt bf16", "transformers bf16")]:
        lines.append(f"- decode {ours} / {theirs}: {ratio((ours, 'dense', 0), (theirs, 'dense', 0))}")
    lines.append(f"- prefill shortrt fp32 / llama.cpp F32: {ratio(('shortrt fp32', 'dense', 0), ('llama.cpp F32', 'dense', 0), 'prefill_tok_s')}; "
                 f"/ transformers fp32: {ratio(('shortrt fp32', 'dense', 0), ('transformers fp32', 'dense', 0), 'prefill_tok_s')}")
    for r in rows:
        if "speedup" in r:
            gap = r["speedup"] / r["ideal_speedup"]
            note = "" if 0.9 <= gap <= 1.1 else (
                " — below the ideal: fixed per-token costs (lm_head, sampling, Python) dominate more" if gap < 0.9
                else " — above the ideal: the smaller working set fits caches better")
            lines.append(f"- {r['label']} {r['variant']} -{r['removed']}: decode {r['speedup']:.2f}× dense, "
                         f"ideal {r['ideal_speedup']:.2f}× by bytes per token; KV cache {r['kv_ratio']:.3f} of dense{note}")
    return "\n".join(lines)


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
