"""`shortrt demo` (placeholder until its issue lands)."""
HELP = "demo (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt demo is not available yet")
