"""The quality cost of bf16 activations: bf16 weights on the avx512 path (activations
kept in fp32) beside the avx512bf16 path (activations rounded to bf16 once per matmul
input, then vdpbf16ps), with fp32 weights as the reference, through the shortrt runtime.

Per row: held-out Persuasion perplexity (shortrt.evaluation.runtime_perplexity, the
windows `shortrt eval` scores), the logits' max |difference| / max |fp32 logit| on a
prompt, and greedy agreement with the fp32 engine (first differing position,
positions equal). The LM head follows the weights (bf16 for the bf16 rows). Models:
the default (its layers were shipped on a 4-bit grid, which bf16 holds exactly) and,
when cached, benchmarks/healing.py's healed span+layer checkpoint (trained, off any grid).
No timing here (benchmarks/kernel_paths.py --dtypes bf16 times the two paths).

    python benchmarks/bf16_activations.py --json benchmarks/results/bf16_activations.json --md benchmarks/results/bf16_activations.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness
from int4_quality import PROMPT, default_offgrid

# (weights dtype, kernel path): the fp32 reference first.
CONFIGS = [("fp32", "avx512"), ("bf16", "avx512"), ("bf16", "avx512bf16")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=4096, help="scored Persuasion tokens (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--greedy-tokens", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--md")
    return p.parse_args(argv)


def measure(path, dtype, kernel_path, args, ref=None) -> dict:
    from shortrt import _C
    from shortrt.engine import Engine
    from shortrt.evaluation import runtime_perplexity

    _C.set_kernels(kernel_path)
    eng = Engine(path, dtype=dtype, threads=args.threads, max_seq=max(args.seq_len, 256))
    ids = eng.encode(PROMPT)
    logits = eng.logits(ids)
    greedy = eng.generate_ids(ids, max_new_tokens=args.greedy_tokens, stop=[])
    ppl = runtime_perplexity(eng, n_tokens=args.ppl_tokens, seq_len=args.seq_len, stride=args.stride)
    row = {"dtype": dtype, "kernels": kernel_path, "activations": "bf16" if kernel_path == "avx512bf16" and dtype == "bf16"
           else "fp32", "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "logits": logits, "greedy": greedy}
    if ref is not None:
        row.update(harness.agreement(row, ref))
    return row


def render(results: dict, args) -> str:
    lines = [f"Held-out Persuasion perplexity through the shortrt runtime ({args.ppl_tokens} scored tokens, windows of "
             f"{args.seq_len}, stride {args.stride}), {args.threads} threads; greedy agreement with the fp32 engine over "
             f"{args.greedy_tokens} tokens of the prompt {PROMPT!r}.", ""]
    for name, info in results.items():
        lines += [f"**{name}** — `{info['path']}`", "",
                  "| weights | kernel path | activations | ppl | vs fp32 | max logit err / max logit | "
                  "greedy: first diff | greedy: equal |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in info["rows"]:
            lines.append(f"| {r['dtype']} | {r['kernels']} | {r['activations']} | {r['ppl']:.3f} | "
                         f"{r.get('ppl_vs_fp32', 1.0):.4f}× | {r.get('rel_err', 0.0):.4f} | "
                         f"{r.get('greedy_first_diff', '-')} | {r.get('greedy_equal', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import shortrt
    from shortrt import _C

    if "avx512bf16" not in _C.kernel_paths():
        sys.exit("this CPU lacks the avx512bf16 path (AVX512_BF16); nothing to compare")
    models = {"default (layers on a 4-bit grid)": shortrt.load("default").path}
    offgrid = default_offgrid()
    if (offgrid / "config.json").is_file():
        models["healed span+layer -8 (off the grid)"] = offgrid
    else:
        print(f"note: {offgrid} not cached (benchmarks/healing.py makes it); default model only", file=sys.stderr)
    before = _C.kernel_active()
    results = {}
    try:
        for name, path in models.items():
            rows, ref = [], None
            for dtype, kernel_path in CONFIGS:
                print(f"{name}: {dtype} weights on {kernel_path}...", file=sys.stderr, flush=True)
                row = measure(path, dtype, kernel_path, args, ref)
                ref = ref or row
                rows.append(row)
            for r in rows:
                r.pop("logits"), r.pop("greedy")
            results[name] = {"path": harness.shown_path(path), "rows": rows}
    finally:
        _C.set_kernels(before)
    md = render(results, args)
    print(md)
    out = {"machine": harness.machine(), "args": vars(args), "command": " ".join(["python"] + sys.argv),
           "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(f"Command: `{out['command']}`\n\nMachine: {out['machine']} — AMD EPYC (family 26, KVM), "
                                 "2 cores, AVX2 + AVX-512 F/BW/VL/DQ/VNNI/BF16, no AMX; shared with other jobs (no "
                                 f"timing in this table).\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
