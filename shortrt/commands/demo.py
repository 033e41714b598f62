"""`shortrt demo`: the whole path on one model — calibrate, prune, and compare dense vs pruned."""
from __future__ import annotations

from . import DTYPES, integer, number

import time
from pathlib import Path

HELP = ("calibrate, remove 25%% of the layers, replace and heal them, and compare dense vs pruned vs healed "
        "outputs, speed, memory and perplexity")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--ratio", type=number(0.0, 1.0, lo_open=True), default=0.25,
                        help="share of layers to remove (default %(default)s)")
    parser.add_argument("--method", default="shortgpt", choices=["shortgpt", "span", "attention", "last", "random"],
                        help="selection method of the plainly pruned model (default %(default)s)")
    parser.add_argument("--tokens", type=integer(1), default=8192, help="calibration tokens (default %(default)s)")
    parser.add_argument("--replace-steps", type=integer(1), default=150,
                        help="training steps of the layer that replaces the removed span (default %(default)s; "
                             "`shortrt replace` uses 300)")
    parser.add_argument("--heal-seconds", type=number(0.0, lo_open=True), default=90.0,
                        help="training seconds of the demo's healing run (default %(default)s; `shortrt heal` "
                             "uses 600: see the README for the full run)")
    parser.add_argument("--train-tokens", type=integer(2), default=16384,
                        help="training tokens of the replacement and of healing (default %(default)s; the "
                             "commands' own defaults are larger)")
    parser.add_argument("--no-heal", action="store_true", help="only calibrate, prune and compare (about a minute)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--threads", type=integer(0, 1024), default=0, help="runtime threads (default: all cores)")
    parser.add_argument("--new-tokens", type=integer(1), default=32, help="tokens per prompt (default %(default)s)")
    parser.add_argument("--ppl-tokens", type=integer(1), default=4096,
                        help="held-out tokens for each perplexity (Persuasion, SciQ; default %(default)s)")
    parser.add_argument("--out", default=None, help="working directory (default: $SHORTRT_CACHE/demo)")


def _decode_speed(engine, prompt_ids, n_new, reps=3):
    """Median decode tokens/s over `reps` runs of n_new greedy tokens (EOS ignored)."""
    import statistics

    speeds = []
    engine.generate_ids(prompt_ids, max_new_tokens=4, stop=[])  # warm-up
    for _ in range(reps):
        stamps = []
        engine.generate_ids(prompt_ids, max_new_tokens=n_new, stop=[],
                            callback=lambda _s, _t: stamps.append(time.perf_counter()) or True)
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(speeds)


def _step(number: int, text: str) -> float:
    print(f"{number}. {text}", flush=True)
    return time.time()


def _took(t0: float) -> None:
    print(f"   ({time.time() - t0:.0f} s)\n", flush=True)


def run(args) -> int:
    import shortrt
    from shortrt.checkpoint import cache_dir
    from shortrt.plots import plot_layer_scores, plot_similarity_heatmap

    t_start = time.time()
    model = shortrt.load(args.model)
    work = Path(args.out) if args.out else cache_dir() / "demo" / model.path.name
    work.mkdir(parents=True, exist_ok=True)
    n_layers = model.config()["num_hidden_layers"]
    seq_len = min(512, int(model.config().get("max_position_embeddings") or 512))
    print(f"== shortrt demo: {model} ({n_layers} layers)\n")

    t = _step(1, f"Calibrating on {args.tokens} tokens of the default text mix ...")
    scores = shortrt.calibrate(model, n_tokens=args.tokens, seq_len=seq_len)
    scores.save(work / "scores.json")
    plot_layer_scores(scores, work / "layer_scores.png")
    plot_similarity_heatmap(scores, work / "similarity.png")
    order = sorted(range(n_layers), key=lambda i: scores.bi[i])
    print("   Block Influence per layer (lower = more redundant):")
    print("   " + " ".join(f"{i}:{scores.bi[i]:.3f}" for i in range(n_layers)))
    print(f"   charts: {work / 'layer_scores.png'}\n           {work / 'similarity.png'}")
    _took(t)

    lmap = shortrt.select(scores, ratio=args.ratio, method=args.method)
    gone = sorted(lmap.removed or lmap.removed_attention)
    what = "attention sublayers" if lmap.removed_attention else "layers"
    t = _step(2, f"Pruning {len(gone)} of {n_layers} {what} ({args.method}): removing {gone}")
    if args.method != "shortgpt":
        print(f"   (the {len(gone)} lowest-BI layers are {sorted(order[:len(gone)])})")
    pruned = shortrt.prune(model, lmap, work / f"{args.method}-p{len(gone)}", overwrite=True)
    print(f"   pruned checkpoint: {pruned.path}")
    _took(t)
    rows = [("dense", model), (f"pruned -{len(gone)}", pruned)]

    if not args.no_heal:
        span = shortrt.select(scores, remove=len(gone), method="span")
        t = _step(3, f"Replacing the most redundant span of {len(gone)} layers, {sorted(span.removed)}, by one "
                     f"trained layer ({args.replace_steps} steps) ...")
        replaced = shortrt.replace(model, span, work / f"span+layer-p{len(gone)}", kind="layer",
                                   n_tokens=args.train_tokens, seq_len=seq_len, steps=args.replace_steps,
                                   overwrite=True)
        _took(t)
        t = _step(4, f"Healing it by distillation from the dense model ({args.heal_seconds:g} s of LoRA training "
                     f"on {args.train_tokens} tokens) ...")
        healed = shortrt.heal(replaced, work / f"span+layer-p{len(gone)}+heal", n_tokens=args.train_tokens,
                              seq_len=seq_len, time_limit=args.heal_seconds, overwrite=True)
        rec = healed.layer_map.healing
        print(f"   {rec['steps']} steps, {rec['tokens_per_second']:.0f} training tokens/s ({rec['precision']}); "
              f"held-out perplexity {rec['ppl_before']:.1f} -> {rec['ppl_after']:.1f} (dense {rec['teacher_ppl']:.1f})")
        _took(t)
        rows.append((f"healed -{len(gone)}+1", healed))

    threads = args.threads or None
    engines = [(name, shortrt.Engine(ckpt, dtype=args.dtype, threads=threads), ckpt) for name, ckpt in rows]
    n = 5 if not args.no_heal else 3
    t = _step(n, f"Greedy outputs on the shortrt runtime ({args.dtype}):")
    width = max(len(name) for name, _, _ in engines)
    for prompt in PROMPTS:
        print(f"\n   prompt: {prompt!r}")
        for name, eng, _ in engines:
            print(f"   {name:<{width}} : {eng.generate(prompt, max_new_tokens=args.new_tokens).strip()!r}")
    print()
    _took(t)

    t = _step(n + 1, "Measuring decode speed and perplexity (Persuasion: a held-out novel; SciQ: a held-out "
                     "domain) ...")
    prompt_ids = engines[0][1].encode(PROMPTS[1])
    stats = []
    for name, eng, ckpt in engines:
        tok_s = _decode_speed(eng, prompt_ids, 64)
        ppl = shortrt.evaluate(ckpt, tasks=["ppl", "ppl_sciq"], n_tokens=args.ppl_tokens, seq_len=seq_len,
                               stride=seq_len // 2, progress=False)["tasks"]
        stats.append((name, eng.num_layers, tok_s, eng.kv_cache_bytes, eng.weight_bytes,
                      ppl["ppl"]["ppl"], ppl["ppl_sciq"]["ppl"]))
    print()
    header = (f"   {'model':<{max(12, width)}} {'layers':>6} {'decode tok/s':>12} {'KV cache':>10} {'weights':>10} "
              f"{'Persuasion':>11} {'SciQ':>8}")
    print(header)
    print("   " + "-" * (len(header) - 3))
    for name, layers, tok_s, kv, wb, ppl, sciq in stats:
        print(f"   {name:<{max(12, width)}} {layers:>6} {tok_s:>12.1f} {kv / 2**20:>7.1f} MiB {wb / 2**20:>6.0f} MiB "
              f"{ppl:>11.2f} {sciq:>8.2f}")
    d = stats[0]
    print()
    for row in stats[1:]:
        print(f"   {row[0]} vs dense: decode {row[2] / d[2]:.2f}x faster, KV cache {row[3] / d[3]:.3f}x "
              f"({row[1]}/{d[1]} layers), weights {row[4] / d[4]:.3f}x, perplexity {row[5] / d[5]:.2f}x "
              f"(SciQ {row[6] / d[6]:.2f}x)")
    _took(t)
    if not args.no_heal:
        print("   The demo heals briefly. The full run (about 10 minutes): shortrt heal "
              f"{work / f'span+layer-p{len(gone)}'} --out DIR")
    print(f"\n   done in {time.time() - t_start:.0f} s; files in {work}")
    return 0
