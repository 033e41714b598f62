"""Span replacement (LLM-Streamline) against plain span removal, on the default model.

For k layers removed by `select(..., method="span")`: perplexity on held-out prose of the dense
model, of plain removal, and of the span replaced by one trained decoder layer (span+layer) or
one trained MLP block (span+mlp), and the share of the lost log-perplexity each replacement
recovers: (log ppl_removed - log ppl_replaced) / (log ppl_removed - log ppl_dense). Beside it,
what the C++ runtime allocates for each: layers run, KV-cache bytes at 2048 tokens, weight bytes.

The replaced checkpoints are made once (shortrt.replacement.replaced_checkpoint) and cached in
$SHORTRT_CACHE/bench/<model>/span+<kind>-p<k>, where benchmarks/latency.py finds them for the
decode-speed comparison (`--variants span,span+layer,span+mlp`).

    python benchmarks/replacement.py                  # k = 8: ~5 min on 2 idle cores, +6 min to train once
    python benchmarks/replacement.py --removed 4,8

Writes summary.json and summary.md to --out (default benchmarks/results/replace/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import harness
from harness import CONTEXT, shown_path  # KV cache reported for CONTEXT tokens

HERE = Path(__file__).resolve().parent
KINDS = ("layer", "mlp")
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"),
                   help="calibration scores (calibrated here on 32768 tokens if missing)")
    p.add_argument("--removed", default="8", help="comma-separated span lengths")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored for perplexity")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per speed run (0 = no speed runs)")
    p.add_argument("--rounds", type=int, default=7, help="speed runs per variant; the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "replace"))
    return p.parse_args(argv)


def load_scores(path: Path, model):
    from shortrt.calibration import Scores, calibrate

    if path.is_file():
        return Scores.load(path), shown_path(path)
    print(f"{path} not found: calibrating (32768 tokens)", file=sys.stderr, flush=True)
    scores = calibrate(model, n_tokens=32768)
    return scores, "calibrated by this run (32768 tokens)"


def runtime_footprint(eng) -> dict:
    return {"layers_run": eng.num_layers, "attention_layers": eng.num_attention_layers,
            "kv_bytes": eng.kv_cache_bytes, "weight_bytes": eng.weight_bytes,
            "bytes_per_token": eng.weight_bytes_per_token}


def measure(model, scores, k: int, kinds, n_tokens: int, decode_tokens: int, rounds: int, threads: int) -> dict:
    from shortrt.engine import Engine
    from shortrt.evaluation import evaluate, evaluate_layer_maps
    from shortrt.layermap import layer_map_of
    from shortrt.pruning import prune
    from shortrt.replacement import replaced_checkpoint
    from shortrt.selection import select
    from shortrt.checkpoint import cache_dir

    lmap = select(scores, remove=k, method="span")
    rows = {}
    base = evaluate_layer_maps(model, {"dense": None, "span": lmap}, ["ppl"], n_tokens=n_tokens)
    for name in ("dense", "span"):
        rows[name] = dict(base[name]["tasks"]["ppl"])
    # Plain removal as a written checkpoint (the one benchmarks/latency.py makes and caches too),
    # so that every variant's engine reads a file of its own size.
    pruned = cache_dir() / "bench" / model.path.name / f"span-p{k}"
    if not (pruned / "config.json").is_file():
        prune(model, lmap, pruned, overwrite=True)
    engines = {"dense": Engine(model.path, threads=threads, max_seq=CONTEXT),
               "span": Engine(pruned, threads=threads, max_seq=CONTEXT)}
    training = {}
    for kind in kinds:
        t0 = time.perf_counter()
        ckpt = replaced_checkpoint(model, scores, k, kind)
        made = time.perf_counter() - t0
        rec = layer_map_of(ckpt).replacement
        training[kind] = {key: rec[key] for key in (
            "init_layer", "parameters", "loss", "data", "steps", "max_steps", "best_step", "batch", "lr", "seed",
            "train_loss", "heldout_loss", "heldout_loss_at_init", "heldout_loss_identity", "seconds", "history")}
        training[kind]["checkpoint"] = shown_path(ckpt.path)
        training[kind]["reused_from_cache"] = made < 0.5 * sum(rec["seconds"].values())
        name = f"span+{kind}"
        rows[name] = dict(evaluate(ckpt, ["ppl"], n_tokens=n_tokens)["tasks"]["ppl"])
        engines[name] = Engine(ckpt.path, threads=threads, max_seq=CONTEXT)
    prompt = engines["dense"].encode(PROMPT)
    speeds = harness.alternating_decode(engines, prompt, decode_tokens, rounds) if decode_tokens else {}
    for name, eng in engines.items():
        rows[name].update(runtime_footprint(eng))
        if speeds:
            rows[name]["decode_tok_s"] = speeds[name]
            rows[name]["decode_vs_dense"] = speeds[name] / speeds["dense"]
            rows[name]["ideal_vs_dense"] = engines["dense"].weight_bytes_per_token / eng.weight_bytes_per_token
    lost = rows["span"]["nll"] - rows["dense"]["nll"]
    for kind in kinds:
        row = rows[f"span+{kind}"]
        row["recovered"] = (rows["span"]["nll"] - row["nll"]) / lost if lost > 0 else math.nan
    return {"removed": k, "span": lmap.removed, "prompt_tokens": len(prompt),
            "span_angular": lmap.scores.get("span", {}).get("angular"),
            "rows": rows, "training": training}


def write_markdown(summary: dict, path: Path) -> None:
    lines = ["# Span replacement (LLM-Streamline) on the default model", "",
             f"Model {summary['model']}; scores {summary['scores']}; perplexity on {summary['ppl_tokens']} held-out "
             f"tokens ({summary['ppl_data']}); {summary['machine']}; {summary['date']}.", ""]
    for res in summary["results"]:
        span = res["span"]
        lines += [f"## {res['removed']} layers removed: span {span[0]}-{span[-1]}", "",
                  "| variant | layers run | attentions (KV slots) | perplexity | lost log-ppl recovered | "
                  f"KV cache @{CONTEXT} | weights | decode tok/s (fp32) | vs dense (ideal) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in res["rows"].items():
            rec = f"{100 * row['recovered']:.0f} %" if "recovered" in row else "-"
            speed = (f"{row['decode_tok_s']:.1f} | {row['decode_vs_dense']:.2f}x ({row['ideal_vs_dense']:.2f}x)"
                     if "decode_tok_s" in row else "- | -")
            lines.append(f"| {name} | {row['layers_run']} | {row['attention_layers']} | {row['ppl']:.2f} | {rec} | "
                         f"{row['kv_bytes'] / 2**20:.1f} MiB | {row['weight_bytes'] / 2**20:.1f} MiB | {speed} |")
        if summary.get("decode_tokens"):
            lines += ["", f"Decode: shortrt fp32, {summary['threads']} threads, {summary['decode_tokens']} tokens "
                      f"after a {res['prompt_tokens']}-token prompt, median of {summary['rounds']} interleaved runs; "
                      "ideal = dense weight bytes read per token / the variant's. On a machine shared with other "
                      "jobs the ratios move by about 10 % between runs; benchmarks/latency.py has the full "
                      "comparison (`--variants span,span+layer,span+mlp`)."]
        lines += ["", "Training (held-out MSE on the span output; identity = plain removal):", "",
                  "| kind | init layer | parameters | tokens | steps (best) | lr | held-out MSE: identity / init / "
                  "trained | capture + train |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for kind, t in res["training"].items():
            lines.append(f"| {kind} | {t['init_layer']} | {t['parameters']:,} | {t['data']['n_tokens']} | "
                         f"{t['steps']} ({t['best_step']}) | {t['lr']:g} | {t['heldout_loss_identity']:.1f} / "
                         f"{t['heldout_loss_at_init']:.1f} / {t['heldout_loss']:.1f} | "
                         f"{t['seconds']['capture']:.0f} + {t['seconds']['train']:.0f} s |")
        lines.append("")
    lines += ["Defaults of `shortrt.replace` (32768 tokens, at most 300 steps, peak lr 4e-3): see tuning.md for the",
              "runs they were chosen from.", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import shortrt
    from shortrt.data import HELDOUT_NOVEL, TITLES

    args = parse_args(argv)
    model = shortrt.load(args.model)
    scores, scores_from = load_scores(Path(args.scores), model)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results = [measure(model, scores, int(k), kinds, args.tokens, args.decode_tokens, args.rounds, args.threads)
               for k in args.removed.split(",")]
    summary = {
        "model": model.name, "scores": scores_from, "ppl_tokens": args.tokens,
        "ppl_data": f"Jane Austen, {TITLES[HELDOUT_NOVEL]} (never used for calibration or training)",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": datetime.date.today().isoformat(), "threads": args.threads, "decode_tokens": args.decode_tokens,
        "rounds": args.rounds, "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, out / "summary.md")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
