"""`shortrt heal`: distill the source model back into a pruned checkpoint (LoRA or full), write it healed."""
from __future__ import annotations

from . import add_device_argument, add_data_argument, data_source, integer, number

HELP = "heal a pruned checkpoint by distillation from its source model (LoRA adapters merged, or --full)"


def add_arguments(parser):
    from shortrt.healing import (DEFAULT_BATCH, DEFAULT_FULL_LR, DEFAULT_LR, DEFAULT_RANK, DEFAULT_SEQ_LEN,
                                 DEFAULT_STEPS, DEFAULT_TIME_LIMIT, DEFAULT_TOKENS)

    parser.add_argument("model", metavar="CKPT", help="pruned checkpoint directory (from prune or replace)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--teacher", help="model to learn from (default: the source its shortrt.json names)")
    add_data_argument(parser, "training text")
    parser.add_argument("--tokens", type=integer(2), default=DEFAULT_TOKENS,
                        help="training tokens, 1/8 of them (at most 8 sequences) held out for early stopping "
                             "(default: %(default)s)")
    parser.add_argument("--seq-len", type=integer(2), default=DEFAULT_SEQ_LEN,
                        help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=integer(1), default=DEFAULT_STEPS,
                        help="most optimizer steps; training stops earlier when the held-out KL stalls "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=integer(1), default=DEFAULT_BATCH, help="sequences per step (default: %(default)s)")
    parser.add_argument("--lr", type=number(0.0, lo_open=True),
                        help=f"peak learning rate (default: {DEFAULT_LR:g} with LoRA, {DEFAULT_FULL_LR:g} with --full)")
    parser.add_argument("--rank", type=integer(1, 4096), default=DEFAULT_RANK, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--alpha", type=number(0.0, lo_open=True), help="LoRA alpha; scale = alpha / rank "
                        "(default: 2 * rank)")
    parser.add_argument("--full", action="store_true", help="train every weight of the retained layers instead of "
                                                            "LoRA adapters")
    parser.add_argument("--temperature", type=number(0.0, lo_open=True), default=1.0,
                        help="distillation temperature (default: %(default)s)")
    parser.add_argument("--hidden-weight", type=number(0.0), default=0.0,
                        help="weight of a hidden-state MSE term against the teacher's layer outputs "
                             "(default: %(default)s)")
    parser.add_argument("--time-limit", type=number(0.0), metavar="SECONDS", default=DEFAULT_TIME_LIMIT,
                        help="seconds of training (steps and held-out checks; the learning-rate schedule is fitted "
                             "to them), 0 for no limit: then --steps alone bounds it (default: %(default)g)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="of the forward and backward passes: bf16 (LoRA: frozen weights and teacher in bf16, "
                             "fp32 adapters merged into the fp32 weights; --full: autocast) or fp32; auto = bf16 on a GPU and "
                             "where the CPU has bf16 instructions (AVX512-BF16, AMX), else fp32 (default: %(default)s)")
    add_device_argument(parser, "the teacher and the training")
    parser.add_argument("--seed", type=integer(0), default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args) -> int:
    from shortrt.errors import ShortrtError
    from shortrt.healing import heal

    try:
        model = heal(args.model, args.out, teacher=args.teacher, texts=data_source(args.data), n_tokens=args.tokens,
                     seq_len=args.seq_len, steps=args.steps, lr=args.lr, batch=args.batch, rank=args.rank,
                     alpha=args.alpha, full=args.full, temperature=args.temperature,
                     hidden_weight=args.hidden_weight, seed=args.seed, precision=args.precision, device=args.device, time_limit=args.time_limit or None, overwrite=args.force,
                     progress=not args.no_progress)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True (--force on the command line)", "pass --force")
        raise ShortrtError(message) from None
    rec = model.layer_map.healing
    what = "all retained-layer weights" if rec["mode"] == "full" else f"LoRA rank {rec['rank']}"
    print(f"healed {len(model.layer_map.layers)} layers from {rec['teacher']}: {what}, "
          f"{rec['trainable_parameters']:,} trainable parameters")
    print(f"{rec['steps']} steps (best {rec['best_step']}, stopped by {rec['stopped']}) on {rec['data']['n_tokens']} tokens in "
          f"{rec['seconds']['total']:.0f} s ({rec['tokens_per_second']} training tokens/s)")
    print(f"held-out KL {rec['kl_before']:.4g} -> {rec['kl_after']:.4g}; perplexity {rec['ppl_before']:.4g} -> "
          f"{rec['ppl_after']:.4g} (teacher {rec['teacher_ppl']:.4g})")
    print(f"checkpoint: {model.path}")
    return 0
