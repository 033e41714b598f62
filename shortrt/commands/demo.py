"""`shortrt demo`: the whole path on one model — calibrate, prune, and compare dense vs pruned."""
from __future__ import annotations

from . import integer, number

import time
from pathlib import Path

HELP = "calibrate, prune 25%% of the layers, and compare dense vs pruned outputs, speed, memory and perplexity"

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--ratio", type=number(0.0, 1.0, lo_open=True), default=0.25, help="share of layers to remove (default %(default)s)")
    parser.add_argument("--method", default="shortgpt", help="selection method (default %(default)s)")
    parser.add_argument("--tokens", type=integer(1), default=8192, help="calibration tokens (default %(default)s)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--threads", type=integer(0, 1024), default=0, help="runtime threads (default: all cores)")
    parser.add_argument("--new-tokens", type=integer(1), default=32, help="tokens per prompt (default %(default)s)")
    parser.add_argument("--ppl-tokens", type=integer(1), default=8192, help="held-out tokens for perplexity")
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


def run(args) -> int:
    import shortrt
    from shortrt.plots import plot_layer_scores, plot_similarity_heatmap
    from shortrt.checkpoint import cache_dir

    t_start = time.time()
    model = shortrt.load(args.model)
    work = Path(args.out) if args.out else cache_dir() / "demo" / model.path.name
    work.mkdir(parents=True, exist_ok=True)
    n_layers = model.config()["num_hidden_layers"]
    seq_len = min(512, int(model.config().get("max_position_embeddings") or 512))
    print(f"== shortrt demo: {model} ({n_layers} layers)\n")

    print(f"1. Calibrating on {args.tokens} tokens of held-in prose ...")
    scores = shortrt.calibrate(model, n_tokens=args.tokens, seq_len=seq_len)
    scores.save(work / "scores.json")
    plot_layer_scores(scores, work / "layer_scores.png")
    plot_similarity_heatmap(scores, work / "similarity.png")
    order = sorted(range(n_layers), key=lambda i: scores.bi[i])
    print("   Block Influence per layer (lower = more redundant):")
    print("   " + " ".join(f"{i}:{scores.bi[i]:.3f}" for i in range(n_layers)))
    print(f"   charts: {work / 'layer_scores.png'}\n           {work / 'similarity.png'}\n")

    lmap = shortrt.select(scores, ratio=args.ratio, method=args.method)
    removed = sorted(lmap.removed)
    print(f"2. Pruning {len(removed)} of {n_layers} layers ({args.method}): removing {removed}")
    if args.method != "shortgpt":
        print(f"   (the {len(removed)} lowest-BI layers are {sorted(order[:len(removed)])})")
    pruned = shortrt.prune(model, lmap, work / f"{args.method}-p{len(removed)}", overwrite=True)
    print(f"   pruned checkpoint: {pruned.path}\n")

    threads = args.threads or None
    dense_eng = shortrt.Engine(model, dtype=args.dtype, threads=threads)
    pruned_eng = shortrt.Engine(pruned, dtype=args.dtype, threads=threads)

    print(f"3. Greedy outputs on the shortrt runtime ({args.dtype}), dense | pruned:")
    for prompt in PROMPTS:
        a = dense_eng.generate(prompt, max_new_tokens=args.new_tokens)
        b = pruned_eng.generate(prompt, max_new_tokens=args.new_tokens)
        print(f"\n   prompt: {prompt!r}")
        print(f"   dense : {a.strip()!r}")
        print(f"   pruned: {b.strip()!r}")
    print()

    print("4. Measuring decode speed and perplexity ...")
    prompt_ids = dense_eng.encode(PROMPTS[1])
    stats = []
    for name, eng, ckpt in (("dense", dense_eng, model), (f"pruned -{len(removed)}", pruned_eng, pruned)):
        tok_s = _decode_speed(eng, prompt_ids, 64)
        ppl = shortrt.evaluate(ckpt, tasks=["ppl"], n_tokens=args.ppl_tokens, seq_len=seq_len,
                                stride=seq_len // 2, progress=False)["tasks"]["ppl"]["ppl"]
        stats.append((name, eng.num_layers, tok_s, eng.kv_cache_bytes, eng.weight_bytes, ppl))
    print()
    header = f"   {'model':<12} {'layers':>6} {'decode tok/s':>12} {'KV cache':>10} {'weights':>10} {'perplexity':>10}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for name, layers, tok_s, kv, wb, ppl in stats:
        print(f"   {name:<12} {layers:>6} {tok_s:>12.1f} {kv / 2**20:>7.1f} MiB {wb / 2**20:>6.0f} MiB {ppl:>10.2f}")
    d, p = stats
    print(f"\n   pruned vs dense: decode {p[2] / d[2]:.2f}x faster, KV cache {p[3] / d[3]:.3f}x "
          f"({p[1]}/{d[1]} layers), weights {p[4] / d[4]:.3f}x, perplexity {p[5] / d[5]:.2f}x")
    print(f"\n   done in {time.time() - t_start:.0f} s; files in {work}")
    return 0
