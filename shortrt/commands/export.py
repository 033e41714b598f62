"""`shortrt export`: write a checkpoint in a format other engines load (GGUF for llama.cpp / ollama,
DeciLM / nemotron-nas for vLLM)."""
from __future__ import annotations

HELP = ("write a checkpoint as a GGUF file for llama.cpp / ollama (attention-less layers as llama.cpp's deci), "
        "or as a DeciLM / nemotron-nas checkpoint for vLLM (--to hf-heterogeneous)")

TYPE_HELP = ("GGUF tensor encoding (default: f16): f32; f16; q8_0 / q4_0 (blocks of 32 with an fp16 scale, "
             "bit for bit llama.cpp's; with q4_0 the embedding and output stay q8_0); norms and biases are "
             "always f32. source: copy the tensors of the GGUF the checkpoint was converted from as stored "
             "(plain layers, not healed). hf-heterogeneous always copies the checkpoint's tensors as stored")
FORMATS = ("gguf", "hf-heterogeneous")


def add_arguments(parser):
    from shortrt.gguf_export import TYPES

    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--to", choices=FORMATS, default="gguf",
                        help="output format: gguf (a file), or hf-heterogeneous (a DeciLM / nemotron-nas "
                             "checkpoint directory with per-block attention and MLP; default: %(default)s)")
    parser.add_argument("--type", choices=TYPES, default=None, dest="qtype", help=TYPE_HELP)
    parser.add_argument("--out", required=True,
                        help="file (gguf) or directory (hf-heterogeneous) to write; built beside it and renamed "
                             "into place when complete")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from shortrt.errors import ShortrtError

    try:
        if args.to == "hf-heterogeneous":
            from shortrt.decilm_export import describe, export_hf_heterogeneous

            if args.qtype is not None:
                raise ShortrtError(f"--type {args.qtype} applies to --to gguf; --to hf-heterogeneous copies the "
                                   "checkpoint's tensors as stored")
            out = export_hf_heterogeneous(args.model, args.out, overwrite=args.force, progress=not args.no_progress)
        else:
            from shortrt.gguf_export import describe, export_gguf

            out = export_gguf(args.model, args.out, qtype=args.qtype or "f16", overwrite=args.force,
                              progress=not args.no_progress)
    except FileExistsError as exc:
        raise ShortrtError(str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")) \
            from None
    print(describe(out))
    return 0
