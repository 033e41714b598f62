"""shortrt: measure layer redundancy in an LLM, remove it, and run the pruned model on a lean C++ runtime.

    import shortrt
    ckpt = shortrt.load("default")
    scores = shortrt.calibrate(ckpt)
    lmap = shortrt.select(scores, remove=8, method="shortgpt")
    pruned = shortrt.prune(ckpt, lmap, "out/smollm2-p8")
    print(shortrt.generate(pruned, "Once upon a time", max_new_tokens=64))
"""
import importlib as _importlib

from .checkpoint import Model, load
from .errors import CheckpointError, DeviceUnavailableError, MissingDependencyError, ShortrtError

__version__ = "0.1.0"

# The public functions load their modules (torch, transformers) on first use, so that
# `import shortrt` and a process that only runs the C++ engine stay light. No module shares a
# public function's name, so importing a submodule never shadows one.
_LAZY = {
    "calibrate": ("calibration", "calibrate"),
    "Scores": ("calibration", "Scores"),
    "select": ("selection", "select"),
    "iterative_select": ("iterative", "iterative_select"),
    "LayerMap": ("layermap", "LayerMap"),
    "LayerEntry": ("layermap", "LayerEntry"),
    "prune": ("pruning", "prune"),
    "replace": ("replacement", "replace"),
    "heal": ("healing", "heal"),
    "evaluate": ("evaluation", "evaluate"),
    "Engine": ("engine", "Engine"),
    "generate": ("engine", "generate"),
    "Budget": ("budget", "Budget"),
    "layers_for_budget": ("budget", "layers_for_budget"),
    "measure_costs": ("costs", "measure_costs"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'shortrt' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


__all__ = [
    "load", "Model", "calibrate", "Scores", "select", "iterative_select", "LayerMap", "LayerEntry", "prune",
    "evaluate", "Engine", "generate", "replace", "heal",
    "Budget", "layers_for_budget", "measure_costs",
    "ShortrtError", "CheckpointError", "MissingDependencyError", "DeviceUnavailableError",
]
