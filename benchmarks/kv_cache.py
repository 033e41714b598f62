"""The KV cache's format (kv_dtype fp32 / f16 / bf16 / int8): bytes, quality and long-context decode.

For the default model dense and with 8 layers removed (shortgpt, and 8 attention sublayers
removed: fewer KV slots than layers; the checkpoints benchmarks/latency.py makes and caches),
and for each kv dtype, side by side in one run:

  KV-cache bytes at max_seq 2048 (one sequence),
  perplexity of the held-out Persuasion text with the runtime's logits
  (shortrt.evaluation.runtime_perplexity: the windows of the "ppl" task),
  decode tokens/s after a long prompt (--context tokens of Persuasion): every kv dtype's engine
  prefills it, then their decode steps take turns one by one, each timed alone (so drift on a
  shared machine hits them alike); the median over --new-tokens steps, then over --rounds rounds.

Ratios are against the fp32 cache of the same variant. Targets (issue 13): f16 exactly half the
bytes and perplexity within 0.5 % of fp32's; int8 a quarter (plus scales), within 2 %.

    python benchmarks/kv_cache.py --quick
    python benchmarks/kv_cache.py --json benchmarks/results/kv_cache.json --md benchmarks/results/kv_cache.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import harness
from harness import fmt_mib

KV_DTYPES = "fp32,f16,bf16,int8"
MAX_SEQ = 2048


def start_request(eng, prompt: list[int], new_tokens: int) -> float:
    """Submits the prompt and steps through its prefill and first token; returns prefill tokens/s."""
    rid = eng.submit(prompt, max_new_tokens=new_tokens + 1, stop=[])
    t0 = time.perf_counter()
    while not any(r == rid and t >= 0 for r, t, _ in eng.step()):
        pass
    return len(prompt) / (time.perf_counter() - t0)


def interleaved_decode(engines: dict, prompt: list[int], new_tokens: int) -> dict:
    """{kv: (decode tokens/s, prefill tokens/s)}: each engine prefills the prompt, then their
    decode steps take turns one by one (so load on a shared machine hits them alike); decode
    tokens/s = 1 / the median step."""
    prefill = {kv: start_request(eng, prompt, new_tokens) for kv, eng in engines.items()}
    steps = {kv: [] for kv in engines}
    for _ in range(new_tokens):
        for kv, eng in engines.items():
            t0 = time.perf_counter()
            eng.step()
            steps[kv].append(time.perf_counter() - t0)
    for eng in engines.values():
        while eng.has_work:
            eng.step()
    return {kv: (1.0 / statistics.median(steps[kv]), prefill[kv]) for kv in engines}


def run_variant(name: str, path: str, args, kv_dtypes: list[str], prompt: list[int]) -> list[dict]:
    from shortrt.engine import Engine
    from shortrt.evaluation import runtime_perplexity

    engines = {kv: Engine(path, dtype=args.dtype, threads=args.threads, max_seq=MAX_SEQ, kv_dtype=kv)
               for kv in kv_dtypes}
    rows = {kv: {"variant": name, "kv_dtype": kv, "layers": e.num_layers, "kv_slots": e.num_attention_layers,
                 "kv_bytes": e.kv_cache_bytes, "decode": [], "prefill": []} for kv, e in engines.items()}
    for r in range(args.rounds):
        for kv, (decode, prefill) in interleaved_decode(engines, prompt, args.new_tokens).items():
            rows[kv]["decode"].append(decode)
            rows[kv]["prefill"].append(prefill)
            print(f"  {name} {kv} round {r + 1}: decode {decode:.1f} tok/s, prefill {prefill:.0f} tok/s",
                  file=sys.stderr, flush=True)
    for kv, eng in engines.items():
        t0 = time.perf_counter()
        rows[kv].update(runtime_perplexity(eng, n_tokens=args.ppl_tokens, seq_len=args.seq_len, stride=args.stride))
        print(f"  {name} {kv}: ppl {rows[kv]['ppl']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    base = rows[kv_dtypes[0]]
    for row in rows.values():
        row["decode_tok_s"] = statistics.median(row["decode"])
        row["prefill_tok_s"] = statistics.median(row["prefill"])
        row["bytes_ratio"] = row["kv_bytes"] / base["kv_bytes"]
        row["ppl_change"] = row["ppl"] / base["ppl"] - 1
        row["decode_ratio"] = row["decode_tok_s"] / statistics.median(base["decode"])
        row["prefill_ratio"] = row["prefill_tok_s"] / statistics.median(base["prefill"])
    return list(rows.values())


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Model `{s['model']}`, weights {s['dtype']}, {s['threads']} threads, batch 1. KV bytes: one sequence "
             f"at max_seq {MAX_SEQ}. Perplexity: runtime logits on {s['ppl_tokens']} held-out Persuasion tokens "
             f"(windows of {s['seq_len']}, stride {s['stride']}). Decode: median step after a {s['context']}-token "
             f"prompt over {s['new_tokens']} steps taking turns across kv dtypes, median of {s['rounds']} rounds; "
             f"ratios vs the "
             f"fp32 cache of the same variant, in this run.", "",
             "| variant | layers | KV slots | kv dtype | KV bytes @2048 | bytes vs fp32 | ppl | ppl vs fp32 | "
             f"decode tok/s @{s['context']} | decode vs fp32 | prefill tok/s | prefill vs fp32 |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['layers']} | {r['kv_slots']} | {r['kv_dtype']} | "
                     f"{fmt_mib(r['kv_bytes'], 2)} MiB | {r['bytes_ratio']:.4f} | {r['ppl']:.4f} | "
                     f"{100 * r['ppl_change']:+.3f}% | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f}x | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="weight format")
    p.add_argument("--kv-dtypes", default=KV_DTYPES, help="kv dtypes, fp32 first (default %(default)s)")
    p.add_argument("--variants", default="dense,shortgpt,attention",
                   help="dense, shortgpt and attention (8 removed) (default %(default)s)")
    p.add_argument("--remove", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens before the timed decode")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration of the pruned checkpoints")
    p.add_argument("--quick", action="store_true", help="1 round, 512-token prompt, 1024 ppl tokens, dense only")
    p.add_argument("--json")
    p.add_argument("--md")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.context, args.ppl_tokens, args.new_tokens, args.variants = 1, 512, 1024, 32, "dense"
    kv_dtypes = [k.strip() for k in args.kv_dtypes.split(",") if k.strip()]
    if not kv_dtypes or kv_dtypes[0] != "fp32":
        p.error("--kv-dtypes must start with fp32 (the baseline of the ratios)")

    import shortrt
    from latency import pruned_checkpoints
    from shortrt import _C
    from shortrt.data import heldout_texts

    model = shortrt.load(args.model)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    pruned = [v for v in variants if v != "dense"]
    ckpts = pruned_checkpoints(args.model, [(v, args.remove) for v in pruned], None, args.calib_tokens) if pruned else {}
    paths = {v: str(model.path) if v == "dense" else ckpts[(v, args.remove)] for v in variants}
    prompt = harness.prompt_ids(model.path, args.context, heldout_texts())
    t0 = time.perf_counter()
    rows = []
    for v in variants:
        name = v if v == "dense" else f"{v}-{args.remove}"
        rows += run_variant(name, paths[v], args, kv_dtypes, prompt)
    for r in rows:
        del r["decode"], r["prefill"]
    result = {"settings": {**harness.shown_args(args, ("json", "md")),
                           "kernels": _C.kernel_active(), "checkpoints": {v: harness.shown_path(p) for v, p in paths.items()}},
              "machine": harness.machine(), "seconds": time.perf_counter() - t0, "rows": rows}
    md = markdown(result)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
