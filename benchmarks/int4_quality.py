"""Quality of int4 weights in the shortrt runtime, with the LM head in each format, next to fp32
and int8, on weights that sit on a 4-bit grid and on weights that do not.

Sources: the default model's layers were shipped as llama.cpp Q4_1 (block 32, fp16 scale and
minimum), so int4 packing reproduces them exactly and only the embedding / LM head (shipped as
Q8_0) and the int8 activations add error; `--offgrid` is a checkpoint whose layers were trained
by shortrt (default: the `heal`ed span+layer checkpoint that benchmarks/healing.py caches: 8 layers
replaced by one trained layer, then LoRA merged into every layer), so none of its layers is on
the grid. Its LM head is still the default model's (heal does not train the embedding).

Per row: held-out Persuasion perplexity through the runtime (shortrt.evaluation.runtime_perplexity,
the windows `shortrt eval` scores), the bytes the engine holds and reads per token, the logits'
max |difference| / max |fp32 logit| on a prompt, and greedy agreement with the fp32 engine over
--greedy-tokens tokens (first differing position, positions equal).

    python benchmarks/int4_quality.py --json benchmarks/results/int4_quality.json --md benchmarks/results/int4_quality.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. Once upon a time, there was a"
# (dtype, lm_head_dtype): the references, then int4 with each LM head.
CONFIGS = [("fp32", "same"), ("int8", "same"), ("int4", "same"), ("int4", "int8"), ("int4", "bf16"), ("int4", "fp32")]


def default_offgrid() -> Path:
    import shortrt
    from shortrt.checkpoint import cache_dir

    return cache_dir() / "bench" / shortrt.load("default").path.name / "span+layer-p8+heal"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--offgrid", default=None, help="an off-grid checkpoint (default: the cached healed span+layer one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=4096, help="scored Persuasion tokens (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--greedy-tokens", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--md")
    return p.parse_args(argv)


def measure(path, dtype, lm_head, args, ref=None) -> dict:
    from shortrt.engine import Engine
    from shortrt.evaluation import runtime_perplexity

    t0 = time.perf_counter()
    eng = Engine(path, dtype=dtype, lm_head_dtype=lm_head, threads=args.threads, max_seq=max(args.seq_len, 256))
    load_s = time.perf_counter() - t0
    ids = eng.encode(PROMPT)
    logits = eng.logits(ids)
    greedy = eng.generate_ids(ids, max_new_tokens=args.greedy_tokens, stop=[])
    ppl = runtime_perplexity(eng, n_tokens=args.ppl_tokens, seq_len=args.seq_len, stride=args.stride)
    row = {"dtype": dtype, "lm_head_dtype": eng.lm_head_dtype, "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"],
           "weight_bytes": eng.weight_bytes, "bytes_per_token": eng.weight_bytes_per_token, "load_s": load_s,
           "logits": logits, "greedy": greedy}
    if ref is not None:
        row.update(harness.agreement(row, ref))
    return row


def render(results: dict, args) -> str:
    lines = [f"Held-out Persuasion perplexity through the shortrt runtime ({args.ppl_tokens} scored tokens, windows of "
             f"{args.seq_len}, stride {args.stride}), {args.threads} threads; greedy agreement with the fp32 engine over "
             f"{args.greedy_tokens} tokens of the prompt {PROMPT!r}.", ""]
    for name, info in results.items():
        lines += [f"**{name}** — `{info['path']}` — source: {info['source']}", "",
                  "| weights | LM head | ppl | vs fp32 | max logit err / max logit | greedy: first diff | greedy: equal | "
                  "bytes/token | weights held |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in info["rows"]:
            lines.append(
                f"| {r['dtype']} | {r['lm_head_dtype']} | {r['ppl']:.3f} | {r.get('ppl_vs_fp32', 1.0):.4f}× | "
                f"{r.get('rel_err', 0.0):.3f} | {r.get('greedy_first_diff', '-')} | {r.get('greedy_equal', '-')} | "
                f"{harness.fmt_mib(r['bytes_per_token'], 1, ' MiB')} | {harness.fmt_mib(r['weight_bytes'], 1, ' MiB')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import shortrt

    offgrid = Path(args.offgrid) if args.offgrid else default_offgrid()
    if not (offgrid / "config.json").is_file():
        sys.exit(f"off-grid checkpoint {offgrid} not found: make one with `shortrt heal` (or run "
                 f"benchmarks/healing.py, which caches it there), or pass --offgrid DIR")
    models = {
        "default (on the 4-bit grid)": (shortrt.load("default").path,
                                        "llama.cpp Q4_1 GGUF (layers; embedding/LM head Q8_0), dequantized to fp32"),
        "healed span+layer -8 (off the grid)": (offgrid, "shortrt replace + heal output: every layer trained, "
                                                         "fp32; LM head the default model's (Q8_0-sourced)"),
    }
    results = {}
    for name, (path, source) in models.items():
        rows, ref = [], None
        for dtype, lm_head in CONFIGS:
            print(f"{name}: {dtype} weights, LM head {lm_head}...", file=sys.stderr)
            row = measure(path, dtype, lm_head, args, ref)
            ref = ref or row
            rows.append(row)
        for r in rows:
            r.pop("logits"), r.pop("greedy")
        results[name] = {"path": harness.shown_path(path), "source": source, "rows": rows}
    md = render(results, args)
    print(md)
    out = {"machine": harness.machine(), "args": vars(args), "command": " ".join(["python"] + sys.argv),
           "results": results}
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(f"Command: `{out['command']}`\n\nMachine: {out['machine']}\n\n{md}\n")


if __name__ == "__main__":
    main()
