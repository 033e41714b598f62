"""Where healing's budget goes: held-out perplexity against healing tokens and against trainable parameters.

One pruned start checkpoint (a cell of benchmarks/quality.py, e.g. span+layer-8: the same span
and the same cached checkpoint) is healed by `shortrt heal` several times, once per variant
(LoRA ranks, full fine-tuning, learning rates), all with the same data, seed and steps. Each
run's record already holds the held-out curve (perplexity on the held-out slice of the training
mix every `eval_every` steps); each final checkpoint is then scored on the two held-out texts
nothing trains on (Persuasion, SciQ), beside the start checkpoint and the dense model.

    python benchmarks/healing.py                                # default start and variants
    python benchmarks/healing.py --start shortgpt-8 --steps 40 --variant r8=rank=8 --variant full=full=1,lr=1e-4
    python benchmarks/healing.py --from r8=DIR --from full=DIR2  # score healed checkpoints made before
    python benchmarks/healing.py --render benchmarks/results/healing.json

Writes healing.json, healing.md and healing.png to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, shown_path

HERE = Path(__file__).resolve().parent
DEFAULT_VARIANTS = ("r2=rank=2", "r8=rank=8", "r32=rank=32", "r8-lr3e-3=rank=8,lr=3e-3", "full=full=1")
KEYS = {"rank": int, "alpha": float, "lr": float, "full": lambda v: v not in ("0", "false", ""),
        "batch": int, "temperature": float, "hidden_weight": float}


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME=key=value,key=value -> (NAME, heal keyword arguments)."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
    kw = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in KEYS or not value:
            raise SystemExit(f"--variant {text!r}: {key!r} is not one of {', '.join(KEYS)} (or has no value)")
        kw[key] = KEYS[key](value)
    return name, kw


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"))
    p.add_argument("--start", default="span+layer-8", help="the quality.py cell to heal (default: %(default)s)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=k=v,...",
                   help=f"a heal setting to run; repeatable (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", type=int, default=None, help="steps of every variant (default: heal's)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens of every variant (default: heal's)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="Persuasion / SciQ tokens scored per checkpoint")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", default="healing")
    p.add_argument("--from", dest="existing", action="append", default=None, metavar="NAME=DIR",
                   help="instead of healing, score this healed checkpoint (made by `shortrt heal` from one start "
                        "checkpoint, which --start then names only; repeatable)")
    p.add_argument("--render", default=None, help="only rewrite the .md and .png from this saved JSON")
    return p.parse_args(argv)


def run(args) -> dict:
    import torch

    import shortrt
    import quality
    from shortrt.calibration import Scores
    from shortrt.evaluation import evaluate
    from shortrt.healing import heal

    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    model = shortrt.load(args.model)
    existing = []
    for item in args.existing or []:
        name, _, path = item.partition("=")
        existing.append((name, shortrt.load(path)))
    if existing:
        missing = [n for n, c in existing if not c.layer_map.healing]
        if missing:
            raise SystemExit(f"--from {missing[0]}: not a healed checkpoint (its shortrt.json has no healing record)")
        layers = {json.dumps(c.layer_map.to_json()["layers"]) for _, c in existing}
        if len(layers) > 1:
            raise SystemExit("--from: the checkpoints were not healed from one start (their layer maps differ)")
    scores = Scores.load(args.scores)
    method, n = quality.method_of(args.start), int(args.start.rsplit("-", 1)[1])
    maps = quality.build_maps(scores, [method], [n], 0)
    start = quality.trained_checkpoint(model, scores, maps, args.start)
    if existing and json.dumps(start.layer_map.to_json()["layers"]) not in layers:
        raise SystemExit(f"--from: the checkpoints run other layers than --start {args.start}")
    common = {k: v for k, v in (("steps", args.steps), ("n_tokens", args.tokens)) if v is not None}
    settings = dict(n_tokens=args.eval_tokens, seq_len=512, stride=512, progress=False)

    def score(ckpt) -> dict:
        r = evaluate(ckpt, "ppl,ppl_sciq", **settings)["tasks"]
        return {t: r[t]["ppl"] for t in ("ppl", "ppl_sciq")}

    rows = {"dense": score(model), "start": score(start)}
    print(f"dense {rows['dense']}, start {args.start} {rows['start']}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(name, None, ckpt) for name, ckpt in existing] or [(name, kw, None) for name, kw in variants]
        for name, kw, out in jobs:
            t = time.time()
            torch.manual_seed(0)
            if out is None:
                out = heal(start, Path(tmp) / name, progress=False, **common, **kw)
            else:
                rec = out.layer_map.healing
                kw = {"rank": rec.get("rank"), "full": rec["mode"] == "full", "lr": rec["lr"]}
            rec = out.layer_map.healing
            final = score(out)
            runs.append({"name": name, "settings": kw, "record": rec, "final": final,
                         "tokens_per_step": rec["batch"] * rec["data"]["seq_len"]})
            print(f"{name}: {rec['trainable_parameters'] / 1e6:.2f} M trainable, {rec['steps']} steps, "
                  f"held-out {rec['ppl_before']:.1f} -> {rec['ppl_after']:.1f}, Persuasion {final['ppl']:.1f}, "
                  f"SciQ {final['ppl_sciq']:.1f} ({time.time() - t:.0f} s)", flush=True)
    return {"meta": {"machine": machine(), "start": args.start, "start_checkpoint": shown_path(start.path),
                     "command": "python benchmarks/healing.py " + " ".join(sys.argv[1:]), "eval": settings,
                     "steps": args.steps, "tokens": args.tokens},
            "reference": rows, "runs": runs}


def markdown(doc) -> str:
    meta, ref = doc["meta"], doc["reference"]
    cpu = meta["machine"]
    lines = [f"# Healing: held-out perplexity against tokens and trainable parameters", "",
             f"Measured {cpu['date']} on {cpu['cpu']} ({cpu['cores']} cores) with `{meta['command']}`.", "",
             f"Start: the `{meta['start']}` checkpoint of benchmarks/quality.py. Every variant heals it with "
             "the same data, seed and steps; `held-out` is the training mix's held-out slice (what early "
             f"stopping watches); Persuasion and SciQ are scored on {meta['eval']['n_tokens']} tokens each "
             "(never trained on).", "",
             "| variant | trainable | steps (best) | tokens trained | held-out ppl | Persuasion | SciQ | train tok/s | time |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|",
             f"| dense | – | – | – | – | {ref['dense']['ppl']:.2f} | {ref['dense']['ppl_sciq']:.2f} | – | – |",
             f"| start ({meta['start']}) | – | – | – | – | {ref['start']['ppl']:.2f} | {ref['start']['ppl_sciq']:.2f} | – | – |"]
    for r in doc["runs"]:
        rec = r["record"]
        lines.append(f"| {r['name']} | {rec['trainable_parameters'] / 1e6:.2f} M | {rec['steps']} ({rec['best_step']}) | "
                     f"{rec['steps'] * r['tokens_per_step']} | {rec['ppl_before']:.1f} → {rec['ppl_after']:.1f} | "
                     f"{r['final']['ppl']:.2f} (×{r['final']['ppl'] / ref['dense']['ppl']:.2f}) | "
                     f"{r['final']['ppl_sciq']:.2f} (×{r['final']['ppl_sciq'] / ref['dense']['ppl_sciq']:.2f}) | "
                     f"{rec['tokens_per_second']:.0f} | {rec['seconds']['total']:.0f} s |")
    lines += ["", "The curve (healing.png): held-out perplexity at each check against tokens trained, per variant; "
              "and the final Persuasion / SciQ perplexity against trainable parameters.", ""]
    return "\n".join(lines)


def plot(doc, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in doc["runs"]:
        hist = r["record"]["history"]
        a.plot([h[0] * r["tokens_per_step"] for h in hist], [h[3] for h in hist], marker="o", label=r["name"])
    a.set_xlabel("tokens trained")
    a.set_ylabel("held-out perplexity (training mix)")
    a.set_yscale("log")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    params = [r["record"]["trainable_parameters"] for r in doc["runs"]]
    for task, label in (("ppl", "Persuasion"), ("ppl_sciq", "SciQ")):
        line = b.plot(params, [r["final"][task] for r in doc["runs"]], marker="o", linestyle="", label=label)
        b.axhline(doc["reference"]["dense"][task], color=line[0].get_color(), linestyle="--", linewidth=0.8)
    for r, x in zip(doc["runs"], params):
        b.annotate(r["name"], (x, r["final"]["ppl"]), fontsize=7)
    b.set_xscale("log")
    b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: the minor labels overlap
    b.set_xlabel("trainable parameters")
    b.set_ylabel("perplexity after healing (dashed: dense)")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    out = Path(args.out)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
    else:
        doc = run(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (out / f"{args.name}.md").write_text(md)
    plot(doc, out / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
