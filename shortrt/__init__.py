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


def __getattr__(name):
    # Heavy modules (torch, transformers) load on first use, so `import shortrt` stays fast.
    lazy = {
        "calibrate": ("calibrate", "calibrate"),
        "Scores": ("calibrate", "Scores"),
        "select": ("select", "select"),
        "LayerMap": ("layermap", "LayerMap"),
        "LayerEntry": ("layermap", "LayerEntry"),
        "prune": ("prune", "prune"),
        "evaluate": ("evaluate", "evaluate"),
        "Engine": ("engine", "Engine"),
        "generate": ("engine", "generate"),
        "replace": ("replace", "replace"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'shortrt' has no attribute {name!r}")


__all__ = [
    "load", "Model", "calibrate", "Scores", "select", "LayerMap", "LayerEntry", "prune",
    "evaluate", "Engine", "generate", "replace",
    "ShortrtError", "CheckpointError", "MissingDependencyError",
]
