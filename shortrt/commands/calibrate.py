"""`shortrt calibrate` (placeholder until its issue lands)."""
HELP = "calibrate (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt calibrate is not available yet")
