"""shortrt: measure layer redundancy in an LLM, remove it, and run the pruned model on a lean C++ runtime.

    import shortrt
    ckpt = shortrt.load("default")
    scores = shortrt.calibrate(ckpt)
    lmap = shortrt.select(scores, remove=8, method="shortgpt")
    pruned = shortrt.prune(ckpt, lmap, "out/smollm2-p8")
    print(shortrt.generate(pruned, "Once upon a time", max_new_tokens=64))
"""
from .errors import CheckpointError, MissingDependencyError, ShortrtError
from .sources import Model, load

__version__ = "0.1.0"


# Function names equal to their module names (shortrt.calibrate, shortrt.select, ...): import
# them eagerly so the function, not the submodule, is what `shortrt.<name>` means.
from .calibrate import Scores, calibrate  # noqa: E402
from .layermap import LayerEntry, LayerMap  # noqa: E402
from .select import select  # noqa: E402
from .prune import prune  # noqa: E402
from .replace import replace  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .engine import Engine, generate  # noqa: E402


__all__ = [
    "load", "Model", "calibrate", "Scores", "select", "LayerMap", "LayerEntry", "prune",
    "evaluate", "Engine", "generate", "replace",
    "ShortrtError", "CheckpointError", "MissingDependencyError",
]
