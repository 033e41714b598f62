"""`shortrt replace` (placeholder until the replacement lands)."""
HELP = "replace a pruned span with a trained layer or MLP (not yet available)"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default")


def run(args):
    raise NotImplementedError("shortrt replace is not available yet")
