"""`shortrt replace`: remove the most redundant span of layers and train one module in its place."""
from __future__ import annotations

from . import add_device_argument, add_data_argument, data_source, integer, number

HELP = "replace the most redundant span of N layers with one trained layer or MLP (LLM-Streamline)"


def add_arguments(parser):
    from shortrt.replacement import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SEQ_LEN, DEFAULT_STEPS, DEFAULT_TOKENS

    parser.add_argument("model", nargs="?", default="default",
                        help="dense checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--scores", required=True, help="scores JSON written by `shortrt calibrate`")
    parser.add_argument("--remove", type=integer(1), required=True, help="length of the span to replace, in layers")
    parser.add_argument("--kind", choices=["layer", "mlp"], default="layer",
                        help="layer: one decoder layer (a standard checkpoint transformers loads); "
                             "mlp: an attention-less MLP block with no KV-cache slot (shortrt runs it) "
                             "(default: %(default)s)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    add_data_argument(parser, "training text")
    parser.add_argument("--tokens", type=integer(1), default=DEFAULT_TOKENS, help="training tokens (default: %(default)s)")
    parser.add_argument("--seq-len", type=integer(2), default=DEFAULT_SEQ_LEN,
                        help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=integer(1), default=DEFAULT_STEPS,
                        help="most optimizer steps; training stops earlier when the held-out loss stalls "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=integer(1), default=DEFAULT_BATCH, help="sequences per step (default: %(default)s)")
    parser.add_argument("--lr", type=number(0.0, lo_open=True), default=DEFAULT_LR, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--cosine-weight", type=number(0.0), default=0.0,
                        help="weight of a (1 - cosine) term added to the MSE loss (default: %(default)s)")
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="capture the span's states one decoder layer at a time with only its weights in memory "
                             "(default: when the model's fp32 weights would take more than a quarter of the "
                             "available memory)")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model")
    add_device_argument(parser, "capture and training")
    parser.add_argument("--seed", type=integer(0), default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args) -> int:
    from shortrt.errors import ShortrtError
    from shortrt.replacement import replace
    from shortrt.selection import select

    layer_map = select(args.scores, remove=args.remove, method="span")
    try:
        model = replace(args.model, layer_map, args.out, kind=args.kind, texts=data_source(args.data), n_tokens=args.tokens,
                        seq_len=args.seq_len, steps=args.steps, lr=args.lr, batch=args.batch,
                        cosine_weight=args.cosine_weight, seed=args.seed, stream=args.stream, device=args.device,
                        overwrite=args.force,
                        progress=not args.no_progress)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")
        raise ShortrtError(message) from None
    rec = model.layer_map.replacement
    span, data = rec["span"], rec["data"]
    print(f"replaced layers {span[0]}-{span[-1]} of {layer_map.source_num_layers} with one {rec['kind']} "
          f"({rec['parameters']:,} parameters, started from layer {rec['init_layer']})")
    print(f"trained {rec['steps']} steps on {data['n_tokens']} tokens in "
          f"{rec['seconds']['capture'] + rec['seconds']['train']:.0f} s; held-out MSE "
          f"{rec['heldout_loss']:.4g} (at init {rec['heldout_loss_at_init']:.4g}, "
          f"plain removal {rec['heldout_loss_identity']:.4g})")
    print(f"checkpoint: {model.path}")
    return 0
