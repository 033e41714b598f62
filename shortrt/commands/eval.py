"""`shortrt eval`: perplexity on held-out prose and multiple-choice accuracy, as a table (and JSON)."""
from __future__ import annotations

from . import data_source, integer, layer_list, text

import json
from pathlib import Path

HELP = "measure perplexity (held-out prose, or your own text) and multiple-choice accuracy (ARC, HellaSwag, PIQA, MMLU)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory (pruned or not), .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--tasks", default="ppl",
                        help="comma-separated: ppl (Persuasion, or --data), ppl_sciq (SciQ science texts), "
                             "arc_easy, arc_challenge, hellaswag, piqa, mmlu, or 'all' (default: %(default)s)")
    parser.add_argument("--data", nargs="+", type=text, default=None, metavar="PATH",
                        help="score ppl on this text instead of Persuasion: one or more .txt / .jsonl files "
                             "(a 'text' field per line) or directories of them")
    parser.add_argument("--samples", type=integer(1), default=200,
                        help="questions per multiple-choice task, drawn with --seed (default: %(default)s)")
    parser.add_argument("--tokens", type=integer(1), default=16384,
                        help="held-out tokens scored for ppl (default: %(default)s)")
    parser.add_argument("--seq-len", type=integer(2), default=512, help="ppl window length (default: %(default)s)")
    parser.add_argument("--stride", type=integer(1), default=256, help="ppl window step (default: %(default)s)")
    parser.add_argument("--seed", type=integer(0), default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--skip-layers", type=layer_list, default=None,
                        help="evaluate with these layers of MODEL skipped, in memory, e.g. 20,21,22")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from shortrt.evaluation import evaluate, format_table
    from shortrt.layermap import LayerMap
    from shortrt.checkpoint import load


    if args.data is not None and "ppl" not in [t.strip() for t in args.tasks.split(",")] and args.tasks != "all":
        raise ValueError("--data sets the text the ppl task scores: add ppl to --tasks")
    model = load(args.model, runtime=False)  # Mamba too (through transformers)
    layer_map = None
    if args.skip_layers:
        n = int(model.config()["num_hidden_layers"])
        layer_map = LayerMap.from_removed(n, args.skip_layers, method="skip")
    result = evaluate(model, args.tasks, n_samples=args.samples, n_tokens=args.tokens, seq_len=args.seq_len,
                      stride=args.stride, seed=args.seed, layer_map=layer_map, progress=not args.no_progress,
                      ppl_data=None if args.data is None else data_source(args.data))
    if layer_map is not None:
        result["skipped_layers"] = layer_map.removed
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
