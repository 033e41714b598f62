"""Quality of every shortrt format beside llama.cpp's formats of the same checkpoint, on the same tokens.

For each model (default: the default model, whose layers were shipped as llama.cpp Q4_1 and so
already sit on a 4-bit grid, and an off-grid checkpoint: the `heal`ed span+layer one
benchmarks/int4_quality.py uses, every layer trained by shortrt), every row scores the same
held-out Persuasion token ids with llama-perplexity's protocol (`--chunks` windows of `--ctx`
tokens back to back, the second half of each scored):

- shortrt runtime rows (shortrt.Engine.logits): fp32, bf16, int8, int4 with its default int8 LM
  head and int4 with an int4 head, each with the KV cache in fp32 and f16;
- llama.cpp rows (llama-perplexity, llama-server) on GGUFs of the same checkpoint: F32, F16,
  Q8_0 and Q4_0 written by `shortrt export` (Q4_0/Q8_0 bit for bit ggml's quantizer; its Q4_0
  keeps the embedding/LM head Q8_0), Q4_1 and Q4_K_M made by llama-quantize from the F32 file,
  each with the KV cache in f32 and f16. Each row's layer and LM-head tensor types are read from
  its file.

The token ids are llama.cpp's tokenization of the text file llama-perplexity reads (llama-server's
/tokenize on the F32 file), checked against shortrt's tokenizer (the table says whether they are
identical); shortrt rows score those ids. Greedy agreement: every row continues the same prompt
ids (shortrt's tokenization of int4_quality's prompt, handed to llama-server as token ids, so
llama.cpp never tokenizes it) for --greedy-tokens tokens, compared with shortrt fp32 / fp32 KV.

Every row runs in its own process (benchmarks/harness.py); a llama.cpp binary that crashes (its
Q8_0 has segfaulted on some AVX-512/AMX machines) becomes a failed row and the run goes on.
Prefill tok/s (the scoring windows) and decode tok/s (the greedy run) come from the same runs;
they are only comparable side by side within one run.

    SHORTRT_LLAMA_CPP_BIN=DIR python benchmarks/llama_cpp_quality.py \\
        --json benchmarks/results/llama_cpp_quality.json --md benchmarks/results/llama_cpp_quality.md
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import harness
import int4_quality
import llama_cpp_tools as lc

# shortrt rows: (weights dtype, LM-head dtype); "auto" is the Engine default (int8 under int4).
SHORTRT = {"fp32": ("fp32", "auto"), "bf16": ("bf16", "auto"), "int8": ("int8", "auto"),
           "int4": ("int4", "auto"), "int4:int4": ("int4", "int4")}
# llama.cpp rows: type -> how the file is made (shortrt export --type, or llama-quantize from F32)
LLAMA = {"F32": ("export", "f32"), "F16": ("export", "f16"), "Q8_0": ("export", "q8_0"),
         "Q4_0": ("export", "q4_0"), "Q4_1": ("quantize", "Q4_1"), "Q4_K_M": ("quantize", "Q4_K_M")}
LLAMA_KV = {"fp32": "f32", "f16": "f16"}  # shortrt kv_dtype -> llama.cpp cache type
SOURCES = {
    "default": "llama.cpp Q4_1 GGUF: layers on the 4-bit grid (Q4_1 reproduces them exactly), "
               "embedding / tied LM head Q8_0-sourced; dequantized to fp32",
    "offgrid": "shortrt replace + heal output: every layer trained, off any 4-bit grid; "
               "tied LM head the default model's (Q8_0-sourced)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to measure (repeatable); default: default=the default model and "
                        "offgrid=int4_quality's healed checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512, help="tokens per scoring window (default %(default)s)")
    p.add_argument("--chunks", type=int, default=8,
                   help="scoring windows; each scores ctx/2 - 1 tokens (default %(default)s)")
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.add_argument("--shortrt", default=",".join(SHORTRT), help="shortrt rows (default %(default)s)")
    p.add_argument("--llama", default=",".join(LLAMA), help="llama.cpp rows (default %(default)s)")
    p.add_argument("--kv", default="fp32,f16", help="KV-cache formats (default %(default)s)")
    p.add_argument("--work", default=None, help="where GGUFs and the text file are kept "
                                                "(default $SHORTRT_CACHE/bench/llama_cpp_quality)")
    p.add_argument("--worker-timeout", type=float, default=3600)
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--render-from", metavar="JSON", help="only re-render the tables of a saved --json run")
    args = p.parse_args(argv)
    for opt, known in (("shortrt", SHORTRT), ("llama", LLAMA), ("kv", LLAMA_KV)):
        items = [x for x in getattr(args, opt).split(",") if x]
        bad = [x for x in items if x not in known]
        if bad:
            p.error(f"unknown --{opt} {bad}: choose from {', '.join(known)}")
        setattr(args, opt, items)
    if args.ctx < 8 or args.ctx % 2:
        p.error("--ctx must be an even number of tokens, 8 or more")
    if args.chunks < 2:
        p.error("--chunks must be 2 or more (llama-perplexity needs two windows of text)")
    return args


def models_of(args) -> dict[str, tuple[Path, str]]:
    import shortrt

    if not args.model:
        offgrid = int4_quality.default_offgrid()
        if not (offgrid / "config.json").is_file():
            sys.exit(f"off-grid checkpoint {offgrid} not found: run benchmarks/healing.py (which caches it "
                     f"there) or pass --model default=default --model offgrid=DIR")
        return {"default": (shortrt.load("default").path, SOURCES["default"]),
                "offgrid": (offgrid, SOURCES["offgrid"])}
    out = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"--model {item!r}: expected NAME=PATH")
        out[name] = (shortrt.load(path).path, SOURCES.get(name, "as given (--model)"))
    return out


# ----------------------------------------------------------------------------- workers

def worker_shortrt(spec: dict) -> dict:
    """One shortrt row: the protocol perplexity of spec's ids, then the greedy continuation."""
    from shortrt.engine import Engine

    ids = json.loads(Path(spec["ids_file"]).read_text())
    prompt, n = spec["prompt"], spec["greedy_tokens"]
    eng = Engine(spec["path"], dtype=spec["dtype"], lm_head_dtype=spec["lm_head_dtype"], kv_dtype=spec["kv"],
                 threads=spec["threads"], max_seq=max(spec["ctx"], len(prompt) + n))
    seconds = []

    def logits_of(window):
        t0 = time.perf_counter()
        out = eng.logits(window)
        seconds.append(time.perf_counter() - t0)
        return out

    ppl = lc.protocol_perplexity(logits_of, ids, spec["ctx"], spec["chunks"], spec.get("bos_id"))
    stamps: list[float] = []
    t0 = time.perf_counter()
    greedy = eng.generate_ids(prompt, max_new_tokens=n, stop=[],
                              callback=lambda _seq, _tok: stamps.append(time.perf_counter()) or True)
    return {"ppl": ppl, "greedy": list(greedy), "lm_head": eng.lm_head_dtype, "weights": eng.dtype,
            "weight_bytes": eng.weight_bytes, "bytes_per_token": eng.weight_bytes_per_token,
            "prefill_tok_s": spec["ctx"] / statistics.median(seconds),
            "decode_tok_s": harness.timings(stamps, t0)["decode_tok_s"] if n > 1 else None}


def worker_llamacpp(spec: dict) -> dict:
    """One llama.cpp row: llama-perplexity on the text file, then llama-server's greedy continuation.
    A binary that fails gives a failed result (why, its return code, the tail of its output)."""
    try:
        ppl = lc.perplexity_run(Path(spec["gguf"]), Path(spec["text_file"]), ctx=spec["ctx"], chunks=spec["chunks"],
                                threads=spec["threads"], kv_type=spec["kv"])
        with lc.server(Path(spec["gguf"]), ctx=max(spec["ctx"], len(spec["prompt"]) + spec["greedy_tokens"] + 8),
                       kv_type=spec["kv"], threads=spec["threads"]) as client:
            answer = client.completion(spec["prompt"], spec["greedy_tokens"])
    except lc.LlamaCppError as e:
        return {"failed": e.why, "returncode": e.returncode, "stderr_tail": harness._tail(e.tail)}
    timings = answer.get("timings") or {}
    return {"ppl": ppl["ppl"], "greedy": list(answer["tokens"]), "prefill_tok_s": ppl["window_tok_s"],
            "ppl_attempts": ppl["attempts"],
            "decode_tok_s": timings.get("predicted_per_second")}


# ----------------------------------------------------------------------------- driver

def tensor_types(gguf_path: Path) -> tuple[str, str]:
    """(the layer matrices' types, e.g. "Q4_K ×150, Q6_K ×30", the LM head's type) of a GGUF file;
    the LM head is output.weight, or the token embedding when the two are tied."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    counts = collections.Counter(t.tensor_type.name for name, t in tensors.items()
                                 if name.startswith("blk.") and len(t.shape) == 2 and min(t.shape) > 1)
    layers = ", ".join(f"{k} ×{v}" for k, v in counts.most_common())
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    tied = "" if "output.weight" in tensors else " (tied: token_embd)"
    return layers, head.tensor_type.name + tied


def make_ggufs(path: Path, work: Path, types: list[str], threads: int) -> dict[str, Path | str]:
    """{type: GGUF file, or why it could not be made}; files are kept in `work` and reused."""
    from shortrt.gguf_export import export_gguf

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path | str] = {}
    needed = list(dict.fromkeys((["F32"] if any(LLAMA[t][0] == "quantize" for t in types) else []) + types))
    for t in needed:
        how, arg = LLAMA[t]
        dst = work / f"{t}.gguf"
        try:
            if not dst.is_file():
                print(f"  making {dst.name}...", file=sys.stderr)
                if how == "export":
                    export_gguf(path, dst, qtype=arg)
                elif isinstance(out.get("F32"), Path):
                    lc.quantize(out["F32"], dst, arg, threads=threads)
                else:
                    raise RuntimeError(f"no F32 file to quantize from ({out.get('F32')})")
            out[t] = dst
        except (lc.LlamaCppError, RuntimeError, ValueError, OSError) as e:
            out[t] = str(e).splitlines()[0]
    return out


def heldout_ids(path: Path, work: Path, f32_gguf: Path, ctx: int, chunks: int, threads: int) -> dict:
    """The held-out text file llama-perplexity reads and the token ids both engines score."""
    from gguf import GGUFReader

    import shortrt
    from shortrt.data import austen_novels

    novel = austen_novels()["persuasion"]
    tok = shortrt.load(path).tokenizer()
    need = ctx * (chunks + 1) + 1  # llama_cpp_tools.perplexity_run runs one window more
    chars = 6 * need
    while True:
        text = novel[:chars]
        ours = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ours) >= need or chars >= len(novel):
            break
        chars *= 2
    if len(ours) < need:
        raise SystemExit(f"Persuasion gives {len(ours)} tokens, {need} needed for --chunks {chunks} --ctx {ctx}")
    text_file = work / "persuasion.txt"
    text_file.write_text(text)
    fields = GGUFReader(str(f32_gguf)).fields

    def field(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    add_bos = bool(field("tokenizer.ggml.add_bos_token"))
    bos_id = field("tokenizer.ggml.bos_token_id") if add_bos else None
    with lc.server(f32_gguf, ctx=ctx, threads=threads) as client:
        theirs = client.tokenize(text)
    if add_bos:  # llama-perplexity tokenizes with the model's special tokens
        theirs = [bos_id] + theirs
        ours = [bos_id] + ours
    diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if diff is None and len(ours) != len(theirs):
        diff = min(len(ours), len(theirs))
    ids_file = work / "persuasion.ids.json"
    ids_file.write_text(json.dumps(theirs))
    return {"text_file": str(text_file), "ids_file": str(ids_file), "bos_id": bos_id, "chars": len(text),
            "tokens": len(theirs), "tokenizers_identical": diff is None, "first_token_difference": diff}


def priority(job: dict) -> int:
    """Jobs in the order that keeps what #13's targets need if a run is cut short: the fp32 reference,
    int4, llama.cpp's Q4_0 / Q4_1 and F32, then the rest (the table lists rows in their own order)."""
    first = [("shortrt", "fp32"), ("shortrt", "int4"), ("llama.cpp", "Q4_0"), ("llama.cpp", "Q4_1"),
             ("llama.cpp", "F32")]
    engine, fmt = job["label"].split(" ", 1)
    return first.index((engine, fmt)) if (engine, fmt) in first else len(first)


def model_rows(name: str, path: Path, source: str, args, work_root: Path) -> dict:
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    work = work_root / f"{Path(path).name}-{key}"
    print(f"{name}: {harness.shown_path(path)}", file=sys.stderr)
    ggufs = make_ggufs(path, work, args.llama, args.threads)
    if not isinstance(ggufs.get("F32"), Path):
        f32 = work / "F32.gguf"
        if not f32.is_file():
            from shortrt.gguf_export import export_gguf

            export_gguf(path, f32, qtype="f32")
        ggufs.setdefault("F32", f32)
    text = heldout_ids(path, work, ggufs["F32"], args.ctx, args.chunks, args.threads)
    import shortrt

    prompt = shortrt.load(path).tokenizer()(int4_quality.PROMPT, add_special_tokens=False)["input_ids"]
    common = {"path": str(path), "threads": args.threads, "ctx": args.ctx, "chunks": args.chunks,
              "greedy_tokens": args.greedy_tokens, "prompt": prompt, "text_file": text["text_file"],
              "ids_file": text["ids_file"], "bos_id": text["bos_id"]}
    jobs, rows = [], []
    for fmt in args.shortrt:
        dtype, head = SHORTRT[fmt]
        for kv in args.kv:
            jobs.append({"engine": "llama_cpp_quality.worker_shortrt", "label": f"shortrt {dtype}",
                         "dtype": dtype, "lm_head_dtype": head, "kv": kv, "variant": f"kv {kv}"})
    for t in args.llama:
        made = ggufs[t]
        for kv in args.kv:
            job = {"engine": "llama_cpp_quality.worker_llamacpp", "label": f"llama.cpp {t}", "type": t,
                   "kv": LLAMA_KV[kv], "variant": f"kv {LLAMA_KV[kv]}", "made_by": LLAMA[t][0]}
            if isinstance(made, Path):
                job["gguf"] = str(made)
                job["weights"], job["lm_head"] = tensor_types(made)
                jobs.append(job)
            else:
                rows.append({**job, "failed": f"no {t} file: {made}", "returncode": None, "stderr_tail": made,
                             "rounds": 0})

    listed = list(jobs)
    jobs.sort(key=priority)
    done = []

    def progress(_r, job, result):
        what = f"FAILED ({result['failed']})" if "failed" in result else f"ppl {result['ppl']:.3f}"
        print(f"  {job['label']} {job['variant']}: {what}", file=sys.stderr)
        done.append({**job, **result})
        if args.json:  # the rows so far, in case the run is cut short
            Path(args.json + ".partial").write_text(json.dumps({"model": name, "rows": done}) + "\n")

    samples = harness.run_jobs(jobs, common, rounds=1, timeout_s=args.worker_timeout, on_sample=progress)
    order = {id(job): i for i, job in enumerate(listed)}
    merged = sorted(zip(jobs, samples), key=lambda js: order[id(js[0])])
    rows = [harness.merge_rounds(job, s) for job, s in merged] + rows
    for r in rows:
        if "gguf" in r:
            r["gguf"] = harness.shown_path(r["gguf"])
    ref = compare_with_reference(rows)
    return {"path": harness.shown_path(path), "source": source, "heldout": {
        k: (harness.shown_path(v) if k.endswith("_file") else v) for k, v in text.items()},
        "ggufs": {t: harness.shown_path(v) if isinstance(v, Path) else f"not made: {v}" for t, v in ggufs.items()},
        "rows": rows, "reference_greedy": ref["greedy"] if ref else None}


def compare_with_reference(rows: list[dict]) -> dict | None:
    """Adds each row's perplexity ratio and greedy agreement against shortrt fp32 with an fp32 KV
    cache (first differing position, positions equal); returns that reference row."""
    for r in rows:
        r.pop("engine", None)
    ref = next((r for r in rows if r.get("label") == "shortrt fp32" and r.get("kv") == "fp32" and "ppl" in r), None)
    for r in rows:
        if ref is not None and "ppl" in r:
            r["ppl_vs_fp32"] = r["ppl"] / ref["ppl"]
            same = [a == b for a, b in zip(r["greedy"], ref["greedy"])]
            r["greedy_first_diff"] = same.index(False) if False in same else len(same)
            r["greedy_equal"] = sum(same)
        r["greedy_compared"] = len(r.get("greedy", []))
    return ref


def find(rows, label, kv):
    return next((r for r in rows if r["label"] == label and r["kv"] == kv and "ppl" in r), None)


def targets(rows) -> list[str]:
    """#13's int4 targets on these rows: int4 ppl <= llama.cpp Q4_0's, and within 1% of Q4_1's."""
    out = []
    for ours_kv, their_kv in (("fp32", "f32"), ("f16", "f16")):
        q40, q41 = find(rows, "llama.cpp Q4_0", their_kv), find(rows, "llama.cpp Q4_1", their_kv)
        for r in rows:
            if r["label"] != "shortrt int4" or r["kv"] != ours_kv or "ppl" not in r:
                continue
            bits = []
            if q40:
                ok = r["ppl"] <= q40["ppl"]
                bits.append(f"vs Q4_0 {q40['ppl']:.3f}: {r['ppl'] / q40['ppl'] - 1:+.2%} ({'met' if ok else 'NOT met'})")
            if q41:
                ok = r["ppl"] <= 1.01 * q41["ppl"]
                bits.append(f"vs Q4_1 {q41['ppl']:.3f}: {r['ppl'] / q41['ppl'] - 1:+.2%} "
                            f"({'met' if ok else 'NOT met'}: within 1%)")
            if bits:
                out.append(f"int4 (LM head {r['lm_head']}, KV {ours_kv}) ppl {r['ppl']:.3f}: " + "; ".join(bits))
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(results: dict, args) -> str:
    lines = [f"Held-out Persuasion, llama-perplexity's protocol on the same token ids for every row: {args.chunks} "
             f"windows of {args.ctx} tokens back to back, tokens {args.ctx // 2 + 1}..{args.ctx - 1} of each scored "
             f"({args.chunks * (args.ctx // 2 - 1)} tokens); {args.threads} threads. Greedy: {args.greedy_tokens} "
             f"tokens after the prompt {int4_quality.PROMPT!r} (shortrt's token ids, given to llama-server as ids), "
             f"compared with shortrt fp32 / fp32 KV (first differing position, positions equal). tok/s: measured "
             f"in the same runs on a machine shared with other jobs, so only side-by-side ratios mean anything; "
             f"prefill = one {args.ctx}-token scoring window (shortrt: the median window; llama.cpp: its first, "
             f"'seconds per pass'), decode = the greedy run.", ""]
    for name, info in results.items():
        h = info["heldout"]
        tokens = ("identical" if h["tokenizers_identical"] else
                  f"DIFFERENT from position {h['first_token_difference']} (both engines score llama.cpp's)")
        lines += [f"**{name}** — `{info['path']}` — source: {info['source']}. Tokenizations of the text "
                  f"(shortrt's tokenizer, llama.cpp's /tokenize on the F32 file): {tokens}.", "",
                  "| engine | layer weights | LM head | KV | ppl | vs shortrt fp32 | greedy: first diff | "
                  "greedy: equal | prefill tok/s (shared) | decode tok/s (shared) |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in info["rows"]:
            weights = r.get("weights", r.get("dtype", ""))
            if r.get("made_by") == "quantize":
                weights += " (llama-quantize from F32)"
            elif r.get("made_by") == "export":
                weights += " (shortrt export)"
            head = r.get("lm_head", "-")
            if "failed" in r:
                lines.append(f"| {r['label']} | {weights} | {head} | {r['kv']} | FAILED: {r['failed']} | | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {weights} | {head} | {r['kv']} | {r['ppl']:.3f} | {fmt(r.get('ppl_vs_fp32'), '.4f')}× | "
                f"{r.get('greedy_first_diff', '-')} | {r.get('greedy_equal', '-')}/{r['greedy_compared']} | "
                f"{fmt(r.get('prefill_tok_s'), '.0f')} | {fmt(r.get('decode_tok_s'), '.1f')} |")
        lines.append("")
        checks = targets(info["rows"])
        if checks:
            lines += ["#13's int4 targets on this source (int4 ppl ≤ llama.cpp Q4_0's; within 1% of Q4_1's):", ""]
            lines += [f"- {c}" for c in checks] + [""]
        bad = harness.failures(info["rows"])
        if bad:
            lines += ["Failed rows:", "", "```", *bad, "```", ""]
    return "\n".join(lines)


def cpu_summary() -> str:
    """The CPU's family and its vector extensions that matter here, from /proc/cpuinfo."""
    family, flags = "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu family" and family == "?":
                family = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f in ("avx2", "fma", "avx_vnni") or f.startswith(("avx512", "amx"))]
    return f"family {family}; {' '.join(keep) or 'no flags read'}" + ("" if any(
        f.startswith("amx") for f in flags) else "; no AMX")


def write_report(out: dict, args) -> str:
    md = render(out["results"], args)
    if args.md:
        m = out["machine"]
        Path(args.md).write_text(
            f"Command: `{out['command']}` (with `{lc.BIN_ENV}` naming the llama.cpp build's bin directory)\n\n"
            f"llama.cpp: {out.get('llama_cpp_version')}\n\n"
            f"Machine: {m['cpu']} ({m.get('cpu_features', '?')}), {m['cores']} cores, shared with other jobs "
            f"(tok/s are side-by-side figures only), Python {m['python']}, {m['platform']}, {m['date']}\n\n"
            f"{md}\n")
    return md


def main(argv=None) -> dict:
    args = parse_args(argv)
    from shortrt.checkpoint import cache_dir

    if args.render_from:  # re-render a saved run's tables (no measuring)
        out = json.loads(Path(args.render_from).read_text())
        saved = argparse.Namespace(**{**vars(args), **{k: v for k, v in out["args"].items()
                                                        if k not in ("json", "md", "render_from")}})
        saved.md = args.md
        print(write_report(out, saved))
        return out
    for exe in ("llama-perplexity", "llama-server") + (("llama-quantize",) if any(
            LLAMA[t][0] == "quantize" for t in args.llama) else ()):
        if lc.binary(exe) is None:
            sys.exit(lc.skip_reason(exe))
    work_root = Path(args.work) if args.work else cache_dir() / "bench" / "llama_cpp_quality"
    results = {name: model_rows(name, path, source, args, work_root)
               for name, (path, source) in models_of(args).items()}
    out = {"machine": {**harness.machine(), "cpu_features": cpu_summary()},
           "args": harness.shown_args(args, ("json", "md", "work")),
           "command": " ".join(["python"] + [harness.shown_path(a) if Path(a).exists() else a for a in sys.argv]),
           "llama_cpp_version": lc.version(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        Path(args.json + ".partial").unlink(missing_ok=True)
    print(write_report(out, args))
    return out


if __name__ == "__main__":
    main()
