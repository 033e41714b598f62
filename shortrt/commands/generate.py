"""`shortrt generate` (placeholder until its issue lands)."""
HELP = "generate (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt generate is not available yet")
