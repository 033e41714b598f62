"""Iterative pruning against one-shot ShortGPT: which layers each removes and the perplexity left.

One iterative run of max(--removed) rounds gives every smaller count too (the method is
deterministic, so its first k rounds are the k-round run). One-shot shortgpt ranks by that run's
first round, the dense model's BI on the same tokens (what `shortrt calibrate` gives, as
tests/test_iterative.py checks), so it costs one round. Perplexity: held-out Persuasion, every
layer map in one pass (shortrt.evaluation.evaluate_layer_maps). --recompute K also times K rounds
with the prefix state recomputed instead of reused (shortrt.iterative's docstring), alternating
with reused runs (--repeats), since other load on the machine drifts; medians and load averages.

    python benchmarks/iterative.py          # ~10 min on 2 idle cores

Writes --json (default benchmarks/results/iterative.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    from shortrt.iterative import DEFAULT_TOKENS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--removed", default=[8, 12], type=lambda s: [int(x) for x in s.split(",")],
                   help="layer counts to compare, e.g. 8,12")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens per round")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored for perplexity")
    p.add_argument("--recompute", type=int, default=8,
                   help="rounds to time with the prefix state recomputed as well as reused (0: skip)")
    p.add_argument("--repeats", type=int, default=2, help="recomputed runs, alternating with reused ones")
    p.add_argument("--json", default=str(HERE / "results" / "iterative.json"))
    p.add_argument("--md", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import shortrt
    from shortrt.evaluation import evaluate_layer_maps
    from shortrt.iterative import iterative_select
    from shortrt.layermap import LayerMap
    from shortrt.selection import select

    args = parse_args(argv)
    model = shortrt.load(args.model)
    n_layers = model.model_config.n_layers
    lmap = iterative_select(model, remove=max(args.removed), n_tokens=args.tokens)
    order, calib = lmap.scores["order"], lmap.calibration
    maps, seconds = {"dense": None}, {"dense": 0.0}
    for k in args.removed:
        maps[f"shortgpt-{k}"] = select(lmap.scores, remove=k, method="shortgpt")
        seconds[f"shortgpt-{k}"] = calib["round_seconds"][0]
        maps[f"iterative-{k}"] = LayerMap.from_removed(n_layers, order[:k], method="iterative")
        seconds[f"iterative-{k}"] = round(sum(calib["round_seconds"][:k]), 2)
    quality = evaluate_layer_maps(model, maps, ["ppl"], n_tokens=args.ppl_tokens)
    rows = []
    for name, m in maps.items():
        ppl = quality[name]["tasks"]["ppl"]
        rows.append({"name": name, "removed": [] if m is None else m.removed, "layers_run": quality[name]["layers"],
                     "ppl": round(ppl["ppl"], 2), "ppl_tokens": ppl["tokens"], "selection_seconds": seconds[name]})
        if name.startswith("iterative"):
            rows[-1]["order"] = order[:len(m.removed)]

    timing = None
    if args.recompute:  # alternate the two ways, the run above being the first reuse sample: load drifts
        k = args.recompute
        timing = {"rounds": k, "reuse": [round(sum(calib["round_seconds"][:k]), 2)], "recompute": [],
                  "layers_run": {"reuse": sum(calib["round_layers_run"][:k])}, "loadavg": [os.getloadavg()[0]]}
        for reuse in [False, True] * (args.repeats - 1) + [False]:
            again = iterative_select(model, remove=k, n_tokens=args.tokens, reuse_prefix=reuse, progress=False)
            assert again.scores["order"] == order[:k]
            way = "reuse" if reuse else "recompute"
            timing[way].append(again.calibration["seconds"])
            timing["layers_run"][way] = sum(again.calibration["round_layers_run"])
            timing["loadavg"].append(os.getloadavg()[0])
        timing["median"] = {way: statistics.median(timing[way]) for way in ("reuse", "recompute")}

    result = {"command": " ".join(["python benchmarks/iterative.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": harness.machine(), "model": model.name, "num_layers": n_layers,
              "calibration": calib, "order": order, "order_scores": lmap.scores["order_scores"],
              "dense_bi": lmap.scores["bi"], "rows": rows, "timing": timing}
    md = table(result)
    print(md)
    harness.save_report(argparse.Namespace(json=args.json, md=args.md, png=None), result, md, rows, None)
    return result


def table(result: dict) -> str:
    lines = [f"{result['model']}, {result['num_layers']} layers; {result['calibration']['n_tokens']} calibration "
             f"tokens per round; perplexity on {result['rows'][0]['ppl_tokens']} held-out tokens; "
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores", "",
             "| variant | layers removed (iterative: in the order removed) | perplexity | selection s |",
             "| --- | --- | ---: | ---: |"]
    for r in result["rows"]:
        removed = ", ".join(map(str, r.get("order", r["removed"]))) or "-"
        secs = f"{r['selection_seconds']:.0f}" if r["removed"] else "-"
        lines.append(f"| {r['name']} | {removed} | {r['ppl']:.1f} | {secs} |")
    t = result["timing"]
    if t:
        lines.append(f"\n{t['rounds']} rounds, median of {len(t['reuse'])} / {len(t['recompute'])} alternating runs: "
                     f"{t['median']['reuse']:.0f} s with the prefix state reused ({t['layers_run']['reuse']} layer "
                     f"passes), {t['median']['recompute']:.0f} s recomputed ({t['layers_run']['recompute']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
