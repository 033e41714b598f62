"""`shortrt prune`: choose layers to remove (from calibration scores or a list) and write the pruned checkpoint."""
from __future__ import annotations

from shortrt.iterative import DEFAULT_TOKENS

from . import DATA_HELP, DTYPES, data_source, integer, layer_list, number, text
from . import size  # the budget options' byte sizes

HELP = "remove layers (or attention sublayers) and write a pruned checkpoint"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--scores", help="scores JSON from `shortrt calibrate` (needed by shortgpt, span, attention)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=integer(1), help="number of layers to remove")
    how.add_argument("--ratio", type=number(0.0, 1.0, lo_open=True), help="fraction of the layers to remove, e.g. 0.25")
    how.add_argument("--layers", type=layer_list, help="remove exactly these layers, e.g. 3,4,5 (with --method attention: "
                                      "remove these layers' attention)")
    # A budget chooses how many layers (attentions) to remove; --method still chooses which.
    how.add_argument("--target-speedup", type=number(1.0, lo_open=True), metavar="X",
                     help="remove the fewest layers whose batch-1 decode speedup over the model reaches X "
                          "(at --dtype and --threads, on this machine; measured once, then cached)")
    how.add_argument("--max-weight-bytes", type=size, metavar="SIZE",
                     help="remove the fewest layers whose weights at --dtype fit in SIZE (100M, 1.5G, 200MiB, bytes)")
    how.add_argument("--max-kv-bytes", type=size, metavar="SIZE",
                     help="remove the fewest layers (attentions) whose KV cache at --max-seq x --max-batch "
                          "fits in SIZE")
    budget = parser.add_argument_group("budget options")
    budget.add_argument("--dtype", choices=DTYPES, help="engine weight format of the budget "
                        "(default: int8)")
    budget.add_argument("--threads", type=integer(1, 1024),
                        help="engine threads of --target-speedup (default: all cores)")
    budget.add_argument("--max-seq", type=integer(1), help="context of --max-kv-bytes (default: the engine's, "
                        "min(max_position_embeddings, 2048))")
    budget.add_argument("--max-batch", type=integer(1, 4096), help="sequences of --max-kv-bytes (default: 1)")
    parser.add_argument("--method", default="shortgpt",
                        choices=["shortgpt", "span", "attention", "last", "random", "iterative"],
                        help="how to choose the layers (default: %(default)s); iterative removes one layer "
                             "per round and recalibrates the pruned model in between (no --scores)")
    iterative = parser.add_argument_group("--method iterative")
    iterative.add_argument("--data", nargs="+", type=text, metavar="PATH",
                           help=DATA_HELP.format(what="calibration text of every round"))
    iterative.add_argument("--tokens", type=integer(1),
                           help=f"calibration tokens per round (default: {DEFAULT_TOKENS})")
    iterative.add_argument("--metric", choices=["bi", "angular"], help="score ranked each round (default: bi)")
    parser.add_argument("--seed", type=integer(0), default=0, help="seed of the random method (default: %(default)s)")
    parser.add_argument("--out", required=True, help="directory to write the pruned checkpoint to")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out directory")


def build_layer_map(args, num_layers: int):
    from shortrt.layermap import LayerMap
    from shortrt.selection import select

    if args.method == "iterative" and args.layers is None:
        return iterative_layer_map(args)
    given = [f"--{name}" for name in ("data", "tokens", "metric") if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for --method iterative")
    if args.layers is not None:
        layers = args.layers
        if args.method == "attention":
            return LayerMap.from_removed_attention(num_layers, layers, method="manual-attention")
        return LayerMap.from_removed(num_layers, layers, method="manual")
    if args.scores is None:
        if args.method in ("shortgpt", "span", "attention"):
            raise ValueError(f"--method {args.method} needs --scores (run `shortrt calibrate` first)")
        scores = {"num_layers": num_layers}
    else:
        scores = args.scores
    lmap = select(scores, remove=args.remove, ratio=args.ratio, method=args.method, seed=args.seed)
    if lmap.source_num_layers != num_layers:
        raise ValueError(f"{args.scores} is for a model with {lmap.source_num_layers} layers, "
                         f"but the model has {num_layers}")
    return lmap


def iterative_layer_map(args):
    from shortrt.iterative import iterative_select

    if args.scores is not None:
        raise ValueError("--method iterative measures the scores itself, round by round: drop --scores")
    return iterative_select(args.model, remove=args.remove, ratio=args.ratio, texts=None if args.data is None else data_source(args.data),
                            n_tokens=args.tokens or DEFAULT_TOKENS, metric=args.metric or "bi")


def check_block_options(args, model) -> None:
    """What a calibrate/prune-only model (Mamba: blocks without sublayers, not run by the runtime) refuses."""
    from shortrt.errors import ShortrtError
    from shortrt.mamba import METHODS

    arch = model.model_config.architecture
    budget = [f"--{n.replace('_', '-')}" for n in ("target_speedup", "max_weight_bytes", "max_kv_bytes")
              if getattr(args, n) is not None]
    if budget:
        raise ShortrtError(f"{budget[0]} measures shortrt's runtime, which does not run {arch}; "
                           "give --remove, --ratio or --layers")
    if args.method not in METHODS:
        raise ShortrtError(f"--method {args.method} is not available for {arch}: a Mamba block has one mixer "
                           f"and no attention or MLP sublayer, and shortrt does not run it (choose "
                           f"{', '.join(METHODS)})")


def format_summary(lmap, out, kv_slots: bool = True) -> str:
    kept = len(lmap.layers)
    lines = [f"method      {lmap.method}",
             f"layers      {kept} of {lmap.source_num_layers} kept"
             + (f", {lmap.num_attention} with attention (KV slots)" if kv_slots else "")]
    if lmap.removed:
        lines.append(f"removed     {', '.join(map(str, lmap.removed))}")
    if lmap.removed_attention:
        lines.append(f"attention   removed in layers {', '.join(map(str, lmap.removed_attention))}")
    scores = lmap.scores or {}
    metric = scores.get("metric")
    if "order" in scores:  # iterative: each layer's score in the round that removed it
        values = ", ".join(f"{i}: {v:.4f}" for i, v in zip(scores["order"], scores["order_scores"]))
        lines.append(f"{metric:<11} in the order removed: {values}")
    elif metric in scores:
        gone = lmap.removed or lmap.removed_attention
        values = ", ".join(f"{i}: {scores[metric][i]:.4f}" for i in gone)
        lines.append(f"{metric:<11} {values}")
    if "span" in scores:
        span = scores["span"]
        lines.append(f"span        layers {span['start']}..{span['start'] + span['length'] - 1}, "
                     f"angular distance {span['angular']:.4f}")
    lines.append(f"written to  {out}")
    if not lmap.transformers_compatible:
        lines.append("note        layers without attention: runs in shortrt (Engine, evaluate), not plain transformers")
    return "\n".join(lines)


def run(args) -> int:
    from shortrt.pruning import prune
    from shortrt.checkpoint import load

    model = load(args.model, runtime=False)  # Mamba is pruned too, though the runtime does not run it
    num_layers = int(model.config()["num_hidden_layers"])
    if not model.runtime_supported:
        check_block_options(args, model)
    prediction = budget_prediction(args, model, num_layers)
    lmap = prediction.layer_map if prediction else build_layer_map(args, num_layers)
    from shortrt.errors import ShortrtError

    try:
        pruned = prune(model, lmap, args.out, overwrite=args.force, progress=True)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")
        raise ShortrtError(message) from None
    print(format_summary(pruned_map(pruned), pruned.path, kv_slots=pruned.runtime_supported))
    if prediction:
        from shortrt.budget import format_verification, verify

        print(format_verification(prediction, verify(prediction, pruned, progress=True)))
    return 0


def pruned_map(pruned):
    from shortrt.layermap import layer_map_of

    return layer_map_of(pruned)


def budget_prediction(args, model, num_layers: int):
    """With a budget option: the layer map it chooses, predicted figure printed (shortrt.budget); else None."""
    import argparse

    from shortrt import budget

    chosen = budget.budget_from_options(
        target_speedup=args.target_speedup, max_weight_bytes=args.max_weight_bytes, max_kv_bytes=args.max_kv_bytes,
        dtype=args.dtype, threads=args.threads, max_seq=args.max_seq, max_batch=args.max_batch)
    if chosen is None:
        return None
    from shortrt.checkpoint import check_out_dir

    try:  # before the measuring (tens of seconds), not after it
        check_out_dir(args.out, model.path, args.force)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")
        raise FileExistsError(message) from None
    pred = budget.layers_for_budget(
        model, chosen, method=args.method, progress=True,
        choose=lambda k: build_layer_map(argparse.Namespace(**{**vars(args), "remove": k}), num_layers))
    print(budget.format_prediction(pred), flush=True)
    return pred
