"""`shortrt eval` (placeholder until its issue lands)."""
HELP = "eval (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt eval is not available yet")
