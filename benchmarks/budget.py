"""Budget-driven pruning on the default model: the predicted figure against the measured one.

For each target speedup (and method), shortrt.budget chooses how many layers or attentions to
remove from the model's cost table (measured once per checkpoint/dtype/threads/CPU and cached),
the checkpoint is written, and its speedup over the dense model is measured with the cost
table's protocol (batch-1 greedy decode of 128 tokens after a 16-token prompt, the two engines
alternating, lower envelope of the rounds: see shortrt/costs.py), `--checks` times. Byte budgets
are exact by construction; one row each shows it on the written checkpoint.

    python benchmarks/budget.py                          # ~2 min on 2 cores (+20 s for the cost table)
    python benchmarks/budget.py --targets 1.3 --checks 5

Writes --json and --md (default benchmarks/results/budget.{json,md}).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"))
    p.add_argument("--dtype", default="int8", choices=["fp32", "bf16", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--targets", default="1.1,1.2,1.3,1.4,1.5", help="speedups for --method shortgpt")
    p.add_argument("--attention-targets", default="1.1,1.2", help="speedups for --method attention")
    p.add_argument("--checks", type=int, default=1, help="measurements of each written checkpoint")
    p.add_argument("--refresh", action="store_true", help="measure the cost table again")
    p.add_argument("--json", default=str(HERE / "results" / "budget.json"))
    p.add_argument("--md", default=str(HERE / "results" / "budget.md"))
    return p.parse_args(argv)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    import shortrt
    from shortrt import costs as costs_mod
    from shortrt.budget import Budget, BudgetError, layers_for_budget, measure_figure
    from shortrt.pruning import prune

    args = parse_args(argv)
    model = shortrt.load(args.model)
    t0 = time.perf_counter()
    costs = costs_mod.measure_costs(model, args.dtype, args.threads, refresh=args.refresh, progress=True)
    rows = []
    jobs = [("shortgpt", Budget("speedup", t, dtype=args.dtype, threads=args.threads)) for t in floats(args.targets)]
    jobs += [("attention", Budget("speedup", t, dtype=args.dtype, threads=args.threads))
             for t in floats(args.attention_targets)]
    n = model.model_config.n_layers
    jobs += [("shortgpt", Budget("weight_bytes", int(costs_mod.weight_table(model, args.dtype).at(n - 4, n - 4)),
                                 dtype=args.dtype)),
             ("attention", Budget("kv_bytes", int(costs_mod.kv_table(model).at(n // 2, n))))]
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        for i, (method, budget) in enumerate(jobs):
            row = {"method": method, "budget": budget.kind, "value": budget.value}
            try:
                pred = layers_for_budget(model, budget, method=method, scores=args.scores, costs=costs)
            except BudgetError as exc:
                rows.append({**row, "failed": str(exc)})
                continue
            out = prune(model, pred.layer_map, Path(tmp) / f"c{i}")
            checks = [measure_figure(out, model, budget) for _ in range(1 if budget.kind != "speedup" else args.checks)]
            measured = statistics.median(checks)
            row.update(removed=pred.count, unit=pred.unit, predicted=pred.predicted, measured=measured,
                       checks=checks, ratio=measured / pred.predicted)
            rows.append(row)
            print(f"{method:9} {budget.kind} {budget.given}: {pred.count} {pred.unit} removed, predicted "
                  f"{budget.show(pred.predicted)}, measured {budget.show(measured)}, ratio {row['ratio']:.3f}",
                  file=sys.stderr)
    result = {"machine": harness.machine(), "args": harness.shown_args(args, ("scores", "json", "md")),
              "costs": costs.to_json() | {"key": costs.key | {"path": harness.shown_path(costs.key["path"])},
                                          "path": harness.shown_path(costs.path), "cached": costs.cached},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    md = markdown(result)
    print(md)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(md + "\n")
    return result


def markdown(result: dict) -> str:
    c, m = result["costs"], result["machine"]
    source = "read from the cache" if c["cached"] else f"measured in {c['seconds']:.0f} s"
    lines = [f"# Budget-driven pruning: predicted vs measured ({m['cpu']}, {m['cores']} cores, {m['date']})", "",
             f"Cost table ({c['key']['dtype']}, threads {c['key']['threads']}, {source}): "
             f"fixed {1e3 * c['fixed_s']:.4g} ms, attention {1e3 * c['attention_s']:.4g} ms, "
             f"MLP {1e3 * c['mlp_s']:.4g} ms per decode step.", "",
             "| method | budget | removed | predicted | measured | measured / predicted |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        what = f"speedup >= {r['value']:g}" if r["budget"] == "speedup" else f"{r['budget']} <= {r['value']:,}"
        if "failed" in r:
            lines.append(f"| {r['method']} | {what} | - | - | - | {r['failed']} |")
            continue
        fmt = (lambda v: f"{v:.3f}x") if r["budget"] == "speedup" else (lambda v: f"{int(v):,}")
        spread = f" ({min(r['checks']):.3f}-{max(r['checks']):.3f})" if len(r["checks"]) > 1 else ""
        lines.append(f"| {r['method']} | {what} | {r['removed']} {r['unit']} | {fmt(r['predicted'])} | "
                     f"{fmt(r['measured'])}{spread} | {r['ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
