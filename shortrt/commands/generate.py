"""`shortrt generate [MODEL] --prompt ...`: text generation on the C++ runtime (or, with --device cuda, the GPU engine)."""
from __future__ import annotations

from . import add_dtype_arguments, integer, layer_list, number, resolve_device_dtypes, text

import sys
import time

HELP = "generate text from a prompt with shortrt's C++ runtime (or its GPU engine: --device cuda)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--prompt", "-p", action="append", required=True, type=text,
                        help="prompt text; repeat for several prompts (generated as one batch)")
    add_dtype_arguments(parser, kv=True, device=True)
    parser.add_argument("--max-new-tokens", "-n", type=integer(0), default=64,
                        help="tokens to generate per prompt (default: %(default)s)")
    parser.add_argument("--temperature", "-t", type=number(0.0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=integer(0), default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=number(0.0, 1.0, lo_open=True), default=1.0,
                        help="nucleus mass in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=integer(0, 2**64 - 1), default=0, help="sampling seed (default: 0)")
    parser.add_argument("--threads", type=integer(1, 1024), default=None, help="default: all cores")
    parser.add_argument("--skip", type=layer_list, default=None,
                        metavar="I,J,...", help="checkpoint layers not to run")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    parser.add_argument("--stats", action="store_true", help="print tokens/s and memory to stderr")


def run(args) -> int:
    from shortrt.engine import Engine

    options = resolve_device_dtypes(args)  # a --device cuda without a GPU stops here, before loading
    t0 = time.perf_counter()
    eng = Engine(args.model, threads=args.threads, max_batch=len(args.prompt), skip_layers=args.skip,
                 lm_head_dtype=args.lm_head_dtype, **options)
    t_load = time.perf_counter() - t0
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, chat=args.chat)
    t0 = time.perf_counter()
    if args.stream:
        for prompt in args.prompt:
            for piece in eng.stream(prompt, **opts):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    else:
        for text in eng.generate(args.prompt, **opts):
            print(text)
    if args.stats:
        print(f"{eng!r}: load {t_load:.2f} s, generation {time.perf_counter() - t0:.2f} s, "
              f"weights {eng.weight_bytes / 2**20:.1f} MiB, KV cache {eng.kv_cache_bytes / 2**20:.1f} MiB",
              file=sys.stderr)
    return 0
