"""Quality after layer removal: methods x layers removed x metrics on the default model.

ShortGPT's central comparison, reproduced: for each selection method (shortgpt, span, last,
random, attention, and the span replaced by a trained layer or MLP: span+layer, span+mlp) and
each number of layers removed, perplexity on held-out prose and
multiple-choice accuracy (ARC-Easy, ARC-Challenge, HellaSwag, PIQA, MMLU), each accuracy with
its standard error. Every cell sees the same questions and windows, so differences between
methods are paired; the "at 8 removed" section gives paired standard errors of the gaps.

The cells are the dense model with layers masked in memory (shortrt.layer_plan): all layer
maps run in one pass over each batch and share the layers they have in common. One cell
(shortgpt at 8) is checked against its written checkpoint, evaluated from disk. The span+layer
and span+mlp cells need trained weights: each is a checkpoint written by shortrt.replace (made
once, cached under $SHORTRT_CACHE/bench like benchmarks/latency.py's) and evaluated from disk on
the same questions and windows.

    python benchmarks/quality.py                 # the full table (~1.5 h on 2 cores, most of it training)
    python benchmarks/quality.py --quick         # a small smoke run
    python benchmarks/quality.py --render benchmarks/results/quality.json   # redo .md/.png only
    python benchmarks/quality.py --extend benchmarks/results/quality.json --methods span+layer,span+mlp
                                                 # add methods to a saved table (its settings, its cells kept)

Writes quality.md, quality.json and quality.png to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, shown_path

HERE = Path(__file__).resolve().parent
METHODS = ("shortgpt", "span", "last", "random", "attention", "span+layer", "span+mlp",
           "shortgpt+heal", "attention+heal", "span+layer+heal")
# Methods whose cells are trained checkpoints (shortrt.replace) rather than masked layer maps.
REPLACED = {"span+layer": "layer", "span+mlp": "mlp"}
# Methods whose cells are another method's checkpoint healed by shortrt.heal (default settings).
HEALED = {"shortgpt+heal": "shortgpt", "attention+heal": "attention", "span+layer+heal": "span+layer"}
TRAINED = {**REPLACED, **HEALED}
PPL = ("ppl", "ppl_sciq")
TASKS = ("ppl", "ppl_sciq", "arc_easy", "arc_challenge", "hellaswag", "piqa", "mmlu")
# The accuracy shown per task: length-normalised where the choices differ much in length
# (lm-evaluation-harness reports acc_norm for these), the raw sum otherwise.
PRIMARY = {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm", "mmlu": "acc"}
LABEL = {"ppl": "perplexity on Persuasion (held-out novel, lower is better)",
         "ppl_sciq": "perplexity on SciQ support texts (held-out domain, lower is better)", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
         "hellaswag": "HellaSwag", "piqa": "PIQA", "mmlu": "MMLU", "avg": "mean accuracy of the five tasks"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"),
                   help="calibration scores; calibrated here (and saved beside the results) if missing")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--removed", default="0,2,4,6,8,10")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=50, help="questions per task")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored for perplexity")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=512, help="ppl window step (= seq-len: disjoint windows)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a machine shared with other jobs two "
                        "threads ran slower than one (each waits for the other at every op)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", default="shortgpt-8", help="cell checked against its written checkpoint ('' = none)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", default="quality", help="file stem of the outputs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 10 questions, 1024 tokens, removed 0,4,8, and no replacement training "
                        "unless --methods names span+layer/span+mlp")
    p.add_argument("--render", default=None, help="only rewrite the .md and .png from this saved results JSON")
    p.add_argument("--extend", default=None,
                   help="a saved results JSON: keep its cells and settings, compute only the cells of --methods "
                        "and --removed it lacks, and rewrite it (with .md/.png) under --out/--name")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.tokens, args.removed, args.name = 10, 1024, "0,4,8", args.name + "_quick"
        if args.methods == p.get_default("methods"):
            args.methods = ",".join(m for m in METHODS if m not in TRAINED)
    return args


def load_scores(args, model):
    from shortrt.calibration import Scores, calibrate

    path = Path(args.scores)
    if path.is_file():
        return Scores.load(path), shown_path(path)
    print(f"{path} not found: calibrating (32768 tokens)", flush=True)
    scores = calibrate(model, n_tokens=32768)
    path = Path(args.out) / f"{args.name}_scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(path)
    return scores, shown_path(path)


def build_maps(scores, methods, counts, seed):
    """{cell name: layer map}; a replaced method's map is the span its trained module stands in for."""
    from shortrt.selection import select

    maps = {"dense": None}
    for method in methods:
        for n in counts:
            if n > 0:
                base = HEALED.get(method, method)
                how = "span" if base in REPLACED else base
                maps[f"{method}-{n}"] = select(scores, remove=n, method=how, seed=seed)
    return maps


def method_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def trained_checkpoint(model, scores, maps, name):
    """The checkpoint of a trained cell: replaced (shortrt.replace) or healed (shortrt.heal, its
    default settings, from the method's own checkpoint). Made once, cached under
    $SHORTRT_CACHE/bench like benchmarks/latency.py's."""
    from shortrt.checkpoint import cache_dir, load
    from shortrt.healing import healed_checkpoint
    from shortrt.pruning import prune
    from shortrt.replacement import replaced_checkpoint

    method, n = method_of(name), int(name.rsplit("-", 1)[1])
    base = HEALED.get(method, method)
    if base in REPLACED:
        ckpt = replaced_checkpoint(model, scores, n, REPLACED[base])
    else:
        ckpt = cache_dir() / "bench" / load(model).path.name / f"{base}-p{n}"
        lmap = maps[name]
        cached = None
        if (ckpt / "shortrt.json").is_file():
            try:
                cached = load(ckpt)
            except Exception:  # damaged or older: write it again
                cached = None
        same = cached is not None and cached.layer_map.to_json()["layers"] == lmap.to_json()["layers"]
        ckpt = cached if same else prune(model, lmap, ckpt, overwrite=True)
    return healed_checkpoint(ckpt) if method in HEALED else ckpt


def evaluate_trained(model, scores, maps, names, tasks, settings, threads) -> dict:
    """{cell: result} for the replaced and healed cells: train (or reuse) each checkpoint, evaluate it from disk."""
    import torch

    from shortrt.evaluation import evaluate_layer_maps
    from shortrt.layermap import layer_map_of

    out = {}
    for name in names:
        t = time.time()
        torch.set_num_threads(os.cpu_count() or 1)  # training is the slow part: give it every core
        try:
            ckpt = trained_checkpoint(model, scores, maps, name)
        finally:
            torch.set_num_threads(threads)
        made = time.time() - t
        r = evaluate_layer_maps(ckpt, {"model": None}, tasks, per_item=True, progress=False, **settings)["model"]
        lmap = layer_map_of(ckpt)
        if lmap.replacement:
            rec = lmap.replacement
            r["replacement"] = {k: rec[k] for k in ("kind", "span", "init_layer", "parameters", "steps", "best_step",
                                                     "heldout_loss", "heldout_loss_identity", "seconds")}
        if lmap.healing:
            rec = lmap.healing
            r["healing"] = {k: rec[k] for k in ("mode", "trainable_parameters", "steps", "best_step", "stopped",
                                                 "kl_before", "kl_after", "ppl_before", "ppl_after", "teacher_ppl",
                                                 "history", "tokens_per_second", "seconds", "precision", "batch",
                                                 "lr", "data")}
        r["checkpoint"] = shown_path(ckpt.path)
        out[name] = r
        print(f"{name}: checkpoint {made:.0f} s, evaluated {time.time() - t - made:.0f} s "
              f"(ppl {r['tasks']['ppl']['ppl']:.2f})" if "ppl" in tasks else f"{name}: done", flush=True)
    return out


def cell(results, name, task):
    return results[name]["tasks"][task]


def accuracy_avg(results, name, tasks):
    mc = [t for t in tasks if t not in PPL]
    if not mc:
        return None
    vals = [cell(results, name, t)[PRIMARY[t]] for t in mc]
    ses = [cell(results, name, t)[PRIMARY[t] + "_se"] for t in mc]
    return sum(vals) / len(vals), math.sqrt(sum(s * s for s in ses)) / len(ses)


def paired_gap(results, a, b, task):
    """(a - b, its paired standard error): accuracy points, or log-perplexity for ppl."""
    if task in PPL:
        ia, ib = cell(results, a, task)["items"], cell(results, b, task)["items"]
        n = ia["window_tokens"]
        d = [x - y for x, y in zip(ia["window_nll"], ib["window_nll"])]
        total = sum(n)
        mean = sum(d) / total
        w = len(d)
        var = sum((di - mean * ni) ** 2 for di, ni in zip(d, n)) * w / max(w - 1, 1) / total ** 2
        return mean, math.sqrt(var)
    key = "correct" if PRIMARY[task] == "acc" else "correct_norm"
    ca, cb = cell(results, a, task)["items"][key], cell(results, b, task)["items"][key]
    d = [x - y for x, y in zip(ca, cb)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1) / len(d)
    return mean, math.sqrt(var)


def fmt(results, name, task, tasks):
    if task == "avg":
        v, se = accuracy_avg(results, name, tasks)
        return f"{100 * v:.1f} ± {100 * se:.1f}"
    m = cell(results, name, task)
    if task in PPL:
        return f"{m['ppl']:.2f}"
    k = PRIMARY[task]
    return f"{100 * m[k]:.1f} ± {100 * m[k + '_se']:.1f}"


def markdown(args, meta, maps, results, methods, counts, tasks) -> str:
    lines = [f"# Quality after layer removal: {meta['model_name']}", "",
             f"Measured {meta['date']} on {meta['machine']} in {meta['seconds'] / 60:.1f} min "
             f"({meta.get('command', '`python benchmarks/quality.py`')}).", "",
             f"- Model: {meta['model_name']} ({meta['num_layers']} layers), fp32, layers masked in memory "
             "(shortrt.layer_plan); the shortgpt-8 cell was also evaluated from its written checkpoint "
             f"({meta['verification']}).",
             f"- Calibration (for shortgpt, span, attention): {meta['calibration']}.",
             f"- Perplexity: the first {args.tokens} tokens of each held-out text, never calibrated or trained on: "
             "Persuasion (the sixth Austen novel) and SciQ's support texts (science: a domain outside the mix), "
             f"windows of {args.seq_len} tokens advancing by {args.stride}.",
             f"- Accuracy: {args.samples} questions per task (seed {args.seed}; the same questions in every cell), "
             "scored by log-likelihood of each choice's text; shown as accuracy ± standard error in points. "
             "Metric per task: " + ", ".join(f"{LABEL[t]} {PRIMARY[t]}" for t in tasks if t not in PPL) +
             " (acc_norm = per-byte log-likelihood). Both are in the JSON.",
             "- `attention` removes N attention sublayers and keeps every MLP (KV cache shrinks by N/L, "
             "weights by less); the other methods remove whole layers.",
             "- `span+layer` and `span+mlp` remove the same N layers as `span` and put one trained module in "
             "their place (LLM-Streamline; `shortrt replace`, default settings: 32768 calibration tokens, at "
             "most 300 steps): a decoder layer, or an attention-less SwiGLU MLP of one layer's MLP size. "
             "Their cells are evaluated from the written checkpoints; training details are at the end.",
             "- `…+heal` cells are that method's checkpoint healed by `shortrt heal` with its default settings "
             "(distillation from the dense model on the default text mix, LoRA merged into the weights); "
             "evaluated from the written checkpoints.",
             "- Chance level: ARC, HellaSwag and MMLU 25 %, PIQA 50 %. A task whose dense score is within a "
             "standard error or two of chance cannot rank the methods at this sample size.", ""]
    header = "| method | " + " | ".join(str(n) for n in counts) + " |"
    rule = "|---|" + "---:|" * len(counts)
    for task in list(tasks) + (["avg"] if len(tasks) > 1 and any(t not in PPL for t in tasks) else []):
        lines += [f"## {LABEL[task]}" + ("" if task in (*PPL, "avg") else f" ({PRIMARY[task]}, %)"), "",
                  "Layers removed →", "", header, rule]
        for method in methods:
            row = [fmt(results, "dense" if n == 0 else f"{method}-{n}", task, tasks) for n in counts]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Layers each method removes", "", header, rule]
    for method in methods:
        row = []
        for n in counts:
            lm = maps.get(f"{method}-{n}")
            row.append("–" if lm is None else ",".join(map(str, lm.removed or lm.removed_attention)))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append("")
    lines += summary_at(results, methods, tasks, 8 if 8 in counts else max(counts))
    lines += vs_dense(results, methods, counts, tasks)
    lines += training_table(results, methods, counts)
    lines += healing_table(results, methods, counts)
    return "\n".join(lines) + "\n"


def vs_dense(results, methods, counts, tasks) -> list[str]:
    """Each cell's paired difference to the dense model: per task, and the mean over the accuracy tasks."""
    mc = [t for t in tasks if t not in PPL]
    rows = []
    for n in (c for c in counts if c):
        for method in methods:
            name = f"{method}-{n}"
            if name not in results:
                continue
            cells = []
            for task in tasks:
                g, se = paired_gap(results, name, "dense", task)
                cells.append(f"×{math.exp(g):.2f}" if task in PPL else f"{100 * g:+.1f} ± {100 * se:.1f}")
            if mc:
                gaps = [paired_gap(results, name, "dense", t) for t in mc]
                mean = sum(g for g, _ in gaps) / len(gaps)
                se = math.sqrt(sum(e * e for _, e in gaps)) / len(gaps)
                cells.append(f"{100 * mean:+.1f} ± {100 * se:.1f}")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = [("ppl ×dense" if t == "ppl" else "SciQ ppl ×dense") if t in PPL else LABEL[t] for t in tasks]
    head += ["mean of the accuracies"] if mc else []
    return ["## Against the dense model", "",
            "Paired differences to dense (same questions, same windows): perplexity as a ratio, accuracy in points "
            "± the paired standard error; the mean's standard error treats the tasks as independent.", "",
            "| cell | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)] + rows + [""]


def healing_table(results, methods, counts) -> list[str]:
    """How each healed cell was trained, and where its time went."""
    rows = []
    for method in (m for m in methods if m in HEALED):
        for n in counts:
            r = results.get(f"{method}-{n}", {}).get("healing")
            if n and r:
                secs = r["seconds"]
                tokens = r["steps"] * r["batch"] * r["data"]["seq_len"]
                rows.append(f"| {method}-{n} | {r['mode']} | {r['trainable_parameters'] / 1e6:.2f} M | "
                            f"{r['data']['n_tokens']} | {r['steps']} (best {r['best_step']}, {r['stopped']}) | "
                            f"{tokens} | {r['ppl_before']:.1f} → {r['ppl_after']:.1f} (teacher {r['teacher_ppl']:.1f}) | "
                            f"{r['tokens_per_second']:.0f} | {secs['teacher']:.0f} + {secs['train']:.0f} + "
                            f"{secs['heldout']:.0f} = {secs['total']:.0f} s |")
    if not rows:
        return []
    return ["## Healing", "",
            "`shortrt heal` with its default settings on the method's checkpoint (teacher: the dense model). "
            "Held-out perplexity here is on the held-out slice of the training mix (the tables above use "
            "Persuasion and SciQ, which healing never sees). Time: teacher top-k targets + training steps + "
            "held-out checks.", "",
            "| cell | mode | trainable | data tokens | steps | tokens trained | held-out ppl | train tok/s | "
            "time |", "|---|---|---:|---:|---:|---:|---|---:|---:|"] + rows + [""]


def training_table(results, methods, counts) -> list[str]:
    """How each replacement cell was trained: span, steps, held-out MSE against plain removal's."""
    rows = []
    for method in (m for m in methods if m in REPLACED):
        for n in counts:
            r = results.get(f"{method}-{n}", {}).get("replacement")
            if n and r:
                secs = r["seconds"]
                share = "–"
                if "ppl" in results["dense"]["tasks"] and f"span-{n}" in results:
                    dense, cut = (math.log(results[k]["tasks"]["ppl"]["ppl"]) for k in ("dense", f"span-{n}"))
                    mine = math.log(results[f"{method}-{n}"]["tasks"]["ppl"]["ppl"])
                    share = f"{100 * (cut - mine) / (cut - dense):.0f} %" if cut > dense else "–"
                rows.append(f"| {method} | {n} | {r['span'][0]}-{r['span'][-1]} | {r['init_layer']} | "
                            f"{r['parameters'] / 1e6:.2f} M | {r['steps']} (best {r['best_step']}) | "
                            f"{r['heldout_loss']:.4g} | {r['heldout_loss_identity']:.4g} | "
                            f"{secs['capture']:.0f} + {secs['train']:.0f} s | {share} |")
    if not rows:
        return []
    return ["## Replacement training", "",
            "Held-out MSE of the span's output hidden state: the trained module vs plain removal (identity). "
            "Recovered: the share of the log-perplexity that removing the span (`span`) lost which the "
            "replacement wins back, (log ppl(span) - log ppl(replaced)) / (log ppl(span) - log ppl(dense)).", "",
            "| method | removed | span | init layer | parameters | steps | held-out MSE | removal MSE | "
            "capture + train | recovered |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"] + rows + [""]


def summary_at(results, methods, tasks, n) -> list[str]:
    names = [f"{m}-{n}" for m in methods if f"{m}-{n}" in results]
    if not names:
        return []
    lines = [f"## At {n} removed: which method wins", "",
             "Gaps are paired (same questions and windows); ± is the paired standard error.", ""]
    lines += ranking(results, names, tasks)
    whole = [k for k in names if method_of(k) not in TRAINED and method_of(k) != "attention"]
    if len(whole) < len(names) and len(whole) > 1:
        lines += ["", "Whole layers removed, nothing trained (without the attention-only and replacement "
                  "methods):", ""]
        lines += ranking(results, whole, tasks)
    lines.append("")
    return lines


def ranking(results, names, tasks) -> list[str]:
    lines = []
    for task in tasks:
        if task in PPL:
            ranked = sorted(names, key=lambda k: cell(results, k, task)["ppl"])
        else:
            ranked = sorted(names, key=lambda k: -cell(results, k, task)[PRIMARY[task]])
        best = ranked[0]
        gaps = []
        for other in ranked[1:]:
            g, se = paired_gap(results, best, other, task)
            if task in PPL:
                gaps.append(f"{other} ppl ×{math.exp(-g):.2f} (log-ppl {-g:+.3f} ± {se:.3f})")
            else:
                gaps.append(f"{other} {-100 * g + 0.0:+.1f} ± {100 * se:.1f} points")
        lines.append(f"- **{LABEL[task]}**: {best} best ({fmt(results, best, task, tasks)}); vs " + "; ".join(gaps))
    return lines


def plot(path, results, methods, counts, tasks):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(tasks) + (["avg"] if len(tasks) > 1 and any(t not in PPL for t in tasks) else [])
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, panels):
        for method in methods:
            names = ["dense" if n == 0 else f"{method}-{n}" for n in counts]
            if task in PPL:
                ys = [cell(results, k, task)["ppl"] for k in names]
                ax.plot(counts, ys, marker="o", label=method)
            else:
                if task == "avg":
                    vs = [accuracy_avg(results, k, tasks) for k in names]
                else:
                    vs = [(cell(results, k, task)[PRIMARY[task]], cell(results, k, task)[PRIMARY[task] + "_se"])
                          for k in names]
                ax.errorbar(counts, [100 * v for v, _ in vs], yerr=[100 * s for _, s in vs], marker="o",
                            capsize=2, label=method)
        if task in PPL:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
        else:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(LABEL[task] if task in (*PPL, "avg") else f"{LABEL[task]} ({PRIMARY[task]})", fontsize=9)
        ax.set_xlabel("layers removed")
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verify(model, maps, results, name, settings, tasks) -> str:
    """Evaluate `name` from its pruned checkpoint and compare with the masked cell."""
    from shortrt.evaluation import evaluate
    from shortrt.pruning import prune

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = prune(model, maps[name], Path(tmp) / name)
        disk = evaluate(ckpt, tasks, progress=False, **settings)
    worst = 0.0
    for task in tasks:
        a, b = disk["tasks"][task], cell(results, name, task)
        if task in PPL:
            worst = max(worst, abs(a["ppl"] / b["ppl"] - 1))
        elif (a["acc"], a["acc_norm"]) != (b["acc"], b["acc_norm"]):
            return f"MISMATCH on {task}: checkpoint {a['acc']}/{a['acc_norm']} vs masked {b['acc']}/{b['acc_norm']}"
    return f"checkpoint equals masked: identical accuracies, perplexity within {worst:.1e} relative"


def render(args) -> int:
    """Rewrite the markdown and the plot from a saved results JSON (no model runs)."""
    from shortrt.layermap import LayerMap

    doc = json.loads(Path(args.render).read_text())
    st = doc["settings"]
    for key in ("n_samples", "n_tokens", "seq_len", "stride", "seed"):
        setattr(args, {"n_samples": "samples", "n_tokens": "tokens", "seq_len": "seq_len"}.get(key, key), st[key])
    maps = {k: (None if v is None else LayerMap.from_json(v)) for k, v in doc["layer_maps"].items()}
    out = Path(args.out)
    md = markdown(args, doc["meta"], maps, doc["results"], st["methods"], st["removed"], st["tasks"])
    (out / f"{args.name}.md").write_text(md)
    plot(out / f"{args.name}.png", doc["results"], st["methods"], st["removed"], st["tasks"])
    print(md)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    if args.render:
        return render(args)
    import torch

    import shortrt
    from shortrt.evaluation import evaluate_layer_maps, parse_tasks
    from shortrt.layermap import LayerMap

    torch.set_num_threads(args.threads)

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    counts = sorted({int(n) for n in args.removed.split(",")} | {0})
    tasks = parse_tasks(args.tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    saved_maps: dict = {}
    spent = 0.0
    if args.extend:
        # The saved table's settings win, so every old and new cell is paired on the same items.
        saved = json.loads(Path(args.extend).read_text())
        st = saved["settings"]
        args.samples, args.tokens, args.seq_len, args.stride, args.seed = (
            st["n_samples"], st["n_tokens"], st["seq_len"], st["stride"], st["seed"])
        methods = list(dict.fromkeys(st["methods"] + methods))
        counts = sorted(set(st["removed"]) | set(counts))
        tasks = st["tasks"]
        results = saved["results"]
        saved_maps = {k: (None if v is None else LayerMap.from_json(v)) for k, v in saved["layer_maps"].items()}
        spent = saved["meta"]["seconds"]
    t0 = time.time()
    model = shortrt.load(args.model)
    scores, scores_path = load_scores(args, model)
    maps = build_maps(scores, methods, counts, args.seed)
    for name, saved_map in saved_maps.items():
        if name in results and saved_map is not None and name in maps and method_of(name) not in TRAINED:
            if saved_map.to_json()["layers"] != maps[name].to_json()["layers"]:
                raise SystemExit(f"{args.extend}: cell {name} was measured with another layer map than the "
                                 f"scores give now ({args.scores}); rerun the whole table instead of extending it")
    todo = [name for name in maps if name not in results]
    masked = {name: maps[name] for name in todo if method_of(name) not in TRAINED}
    replaced = [name for name in todo if method_of(name) in TRAINED]
    settings = dict(n_samples=args.samples, n_tokens=args.tokens, seq_len=args.seq_len, stride=args.stride,
                    seed=args.seed)
    print(f"{len(masked)} masked layer maps + {len(replaced)} trained checkpoints x {len(tasks)} tasks "
          f"({len(maps) - len(todo)} cells kept from {args.extend}); {torch.get_num_threads()} threads"
          if args.extend else
          f"{len(masked)} masked layer maps + {len(replaced)} trained checkpoints x {len(tasks)} tasks; "
          f"{torch.get_num_threads()} threads", flush=True)

    if masked:
        hf = model.load_hf()
        tok = model.tokenizer()
        for task in tasks:
            t = time.time()
            part = evaluate_layer_maps(model, masked, [task], hf=hf, tokenizer=tok, per_item=True, **settings)
            for name, r in part.items():
                results.setdefault(name, {"layers": r["layers"], "attention_layers": r["attention_layers"],
                                          "tasks": {}})
                results[name]["tasks"][task] = r["tasks"][task]
            first = next(iter(part.values()))
            print(f"{task}: {time.time() - t:.0f} s ({first['settings']['tokens_run']} tokens per pass)", flush=True)
            (out / f"{args.name}.partial.json").write_text(json.dumps({"results": results}) + "\n")
        del hf
    for name, r in evaluate_trained(model, scores, maps, replaced, tasks, settings, args.threads).items():
        results[name] = {k: r[k] for k in ("layers", "attention_layers", "tasks", "replacement", "healing",
                                           "checkpoint") if k in r}
        (out / f"{args.name}.partial.json").write_text(json.dumps({"results": results}) + "\n")

    verification = "not run"
    if args.extend:
        verification = saved["meta"]["verification"]
    elif args.verify and args.verify in maps:
        t = time.time()
        verification = verify(model, maps, results, args.verify, settings, tasks)
        print(f"verify {args.verify}: {verification} ({time.time() - t:.0f} s)", flush=True)

    calib = scores.data or {}
    meta = {
        "model_name": "SmolLM2-135M-Instruct" if args.model == "default" else args.model,
        "num_layers": scores.num_layers,
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine()['cpu']} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}",
        "seconds": spent + time.time() - t0,
        "calibration": f"{calib.get('n_tokens', '?')} tokens of {calib.get('source', '?')} ({scores_path})",
        "verification": verification,
        "command": "`" + " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
    }
    if args.extend:
        added = [m for m in methods if m not in saved["settings"]["methods"]] or ["missing cells"]
        meta["command"] = (saved["meta"].get("command", "`python benchmarks/quality.py`")
                           + f", then `--extend` with {', '.join(added)}")
    doc = {"meta": meta, "settings": {**settings, "methods": methods, "removed": counts, "tasks": tasks,
                                      "primary_metric": PRIMARY},
           "layer_maps": {k: (None if v is None else v.to_json()) for k, v in maps.items()},
           "results": results}
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(args, meta, maps, results, methods, counts, tasks)
    (out / f"{args.name}.md").write_text(md)
    plot(out / f"{args.name}.png", results, methods, counts, tasks)
    (out / f"{args.name}.partial.json").unlink(missing_ok=True)
    print(md)
    print(f"wrote {out / args.name}.md/.json/.png in {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
