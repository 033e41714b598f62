"""`shortrt export`: write a checkpoint in a format other engines load (GGUF for llama.cpp / ollama)."""
from __future__ import annotations

HELP = "write a checkpoint as a GGUF file for llama.cpp / ollama (attention-less layers as llama.cpp's deci)"

TYPE_HELP = ("tensor encoding (default: %(default)s): f32; f16; q8_0 / q4_0 (blocks of 32 with an fp16 scale, "
             "bit for bit llama.cpp's; with q4_0 the embedding and output stay q8_0); norms and biases are "
             "always f32. source: copy the tensors of the GGUF the checkpoint was converted from as stored "
             "(plain layers, not healed)")


def add_arguments(parser):
    from shortrt.gguf_export import TYPES

    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--to", choices=["gguf"], default="gguf", help="output format (default: %(default)s)")
    parser.add_argument("--type", choices=TYPES, default="f16", dest="qtype", help=TYPE_HELP)
    parser.add_argument("--out", required=True, help="file to write (written to a temporary file, then renamed)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from shortrt.errors import ShortrtError
    from shortrt.gguf_export import describe, export_gguf

    try:
        out = export_gguf(args.model, args.out, qtype=args.qtype, overwrite=args.force,
                          progress=not args.no_progress)
    except FileExistsError as exc:
        raise ShortrtError(str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")) \
            from None
    print(describe(out))
    return 0
