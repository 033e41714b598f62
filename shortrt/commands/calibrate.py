"""`shortrt calibrate`: per-layer Block Influence, angular distance and span similarities, saved as JSON + PNGs."""
from __future__ import annotations

from . import add_device_argument, add_data_argument, data_source, integer, size

import math
from pathlib import Path

HELP = "measure each layer's Block Influence and angular distance on calibration text"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--out", required=True, help="scores JSON to write, e.g. scores.json")
    add_data_argument(parser, "calibration text")
    parser.add_argument("--tokens", type=integer(1), default=32768, help="calibration tokens (default: %(default)s)")
    parser.add_argument("--seq-len", type=integer(2), default=512, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--batch-size", type=integer(1), default=4, help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--max-span", type=integer(1), default=None,
                        help="longest span in the depth x depth table (default: all layers)")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                        help="cosine kernel backend (default: %(default)s)")
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="run one decoder layer at a time with only its weights in memory (default: when the "
                             "model's fp32 weights would take more than a quarter of the available memory)")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model")
    parser.add_argument("--state-memory", type=size, default=None, metavar="BYTES",
                        help="with --stream: memory for the hidden states of max-span + 1 depths (fp32); more tokens "
                             "run in further groups, each reading the weights once more (default: 1.5GiB)")
    add_device_argument(parser, "the model")
    parser.add_argument("--plots", default=None, help="directory for the two PNGs (default: next to --out)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def plot_paths(out: Path, plots_dir: str | None) -> tuple[Path, Path]:
    directory = Path(plots_dir) if plots_dir else out.parent
    return directory / f"{out.stem}_layers.png", directory / f"{out.stem}_heatmap.png"


def format_table(scores) -> str:
    def cell(value: float) -> str:
        return "     -" if value is None or math.isnan(value) else f"{value:.4f}"

    lines = ["layer      BI  angular  attn BI   mlp BI"]
    for i in range(scores.num_layers):
        lines.append(f"{i:5d}  {cell(scores.bi[i])}   {cell(scores.angular[i])}   "
                     f"{cell(scores.attn_bi[i])}   {cell(scores.mlp_bi[i])}")
    return "\n".join(lines)


def run(args) -> int:
    from shortrt.calibration import calibrate
    from shortrt.errors import ShortrtError
    from shortrt.plots import plot_layer_scores, plot_similarity_heatmap

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ShortrtError(f"{out} already exists; pass --force to overwrite it")
    if out.suffix.lower() != ".json":
        raise ShortrtError(f"--out should name a .json file, got {out}")
    layers_png, heatmap_png = plot_paths(out, args.plots)

    scores = calibrate(args.model, data_source(args.data), n_tokens=args.tokens, seq_len=args.seq_len,
                       max_span=args.max_span, batch_size=args.batch_size, backend=args.backend,
                       stream=args.stream, device=args.device, progress=not args.no_progress,
                       **({} if args.state_memory is None else {"state_bytes": args.state_memory}))

    out.parent.mkdir(parents=True, exist_ok=True)
    layers_png.parent.mkdir(parents=True, exist_ok=True)
    scores.save(out)
    plot_layer_scores(scores, layers_png)
    plot_similarity_heatmap(scores, heatmap_png)

    data = scores.data
    print(f"{scores.model}: {data['n_tokens']} tokens ({data['n_sequences']} x {data['seq_len']}) "
          f"of {data['source']} in {data['seconds']:.1f} s{' (layer streaming)' if data.get('streamed') else ''}")
    print(format_table(scores))
    if "score_kinds" in data:  # Mamba: one mixer per block, so no sublayer scores
        print(f"note:    a {data['architecture']} block has one mixer and no attention or MLP sublayer: its scores "
              f"are {', '.join(data['score_kinds'])}")
    print(f"scores:  {out}")
    print(f"plots:   {layers_png}\n         {heatmap_png}")
    return 0
