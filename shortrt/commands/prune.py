"""`shortrt prune` (placeholder until its issue lands)."""
HELP = "prune (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt prune is not available yet")
