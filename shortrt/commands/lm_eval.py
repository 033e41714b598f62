"""`shortrt lm-eval`: score a checkpoint with lm-evaluation-harness tasks on the C++ runtime."""
from __future__ import annotations

from . import add_dtype_arguments, integer, text

import json
from pathlib import Path

HELP = "score a model with lm-evaluation-harness tasks (arc_easy, hellaswag, mmlu, ...) on the C++ runtime"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory (pruned or not), .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--tasks", required=True, type=text,
                        help="comma-separated lm-eval task or group names (lm-eval downloads the data sets the "
                             "first time, or reads the local ones your --include-path task files name)")
    add_dtype_arguments(parser, kv=True)
    parser.add_argument("--threads", type=integer(1, 4096), default=None, help="worker threads (default: all cores)")
    parser.add_argument("--max-seq", type=integer(1), default=None,
                        help="context length in tokens: longer inputs are cut from the left "
                             "(default: min(max_position_embeddings, 2048))")
    parser.add_argument("--batch-size", type=integer(1, 4096), default=1,
                        help="generation requests decoded at once (default: %(default)s)")
    parser.add_argument("--num-fewshot", type=integer(0), default=None,
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--limit", type=integer(1), default=None, help="score only the first N examples of each task")
    parser.add_argument("--include-path", type=text, default=None,
                        help="a directory of extra task YAML files (e.g. a task over local jsonl files)")
    parser.add_argument("--seed", type=integer(0), default=0,
                        help="seed of lm-eval's random choices (few-shot examples) (default: %(default)s)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="format prompts with the checkpoint's chat template")
    parser.add_argument("--json", default=None, help="also write lm-eval's results (without per-sample logs) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args) -> int:
    from shortrt.errors import MissingDependencyError

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise MissingDependencyError("shortrt lm-eval needs lm-evaluation-harness: pip install lm-eval==0.4.13") from None
    from shortrt.lm_eval_adapter import ShortrtLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path}: not a directory")
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown} (`lm-eval ls tasks` lists them; add your own task "
                         "files with --include-path)")
    lm = ShortrtLM(args.model, dtype=args.dtype, lm_head_dtype=args.lm_head_dtype, kv_dtype=args.kv_dtype,
                   threads=args.threads, max_seq=args.max_seq, batch_size=args.batch_size)
    if args.no_progress:
        _quiet(lm)
    result = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                     task_manager=manager, log_samples=False, random_seed=args.seed,
                                     numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                     fewshot_random_seed=args.seed, apply_chat_template=args.apply_chat_template)
    print(f"model {lm.engine.checkpoint_dir}: {lm.engine.num_layers} layers, {args.dtype}, "
          f"max_seq {lm.engine.max_seq}")
    print(make_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: result[k] for k in ("results", "configs", "versions", "n-shot")
                                    if k in result}, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


def _quiet(lm) -> None:
    """Run lm's request methods without their progress bars."""
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)
        setattr(lm, name, lambda requests, disable_tqdm=False, _m=method: _m(requests, disable_tqdm=True))
