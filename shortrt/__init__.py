"""shortrt: measure layer redundancy in an LLM, remove it, and run the pruned model on a lean C++ runtime.

    import shortrt
    ckpt = shortrt.load("default")
    scores = shortrt.calibrate(ckpt)
    lmap = shortrt.select(scores, remove=8, method="shortgpt")
    pruned = shortrt.prune(ckpt, lmap, "out/smollm2-p8")
    print(shortrt.generate(pruned, "Once upon a time", max_new_tokens=64))
"""
import importlib as _importlib
import sys as _sys
import types as _types

from .errors import CheckpointError, MissingDependencyError, ShortrtError
from .checkpoint import Model, load

__version__ = "0.1.0"


# The public functions load their modules (torch, transformers) on first use, so that
# `import shortrt` and a process that only runs the C++ engine stay light. Several share their
# module's name (shortrt.calibrate is a function in shortrt/calibrate.py): the package keeps
# the function under that name even after the submodule is imported.
_LAZY = {
    "calibrate": ("calibrate", "calibrate"),
    "Scores": ("calibrate", "Scores"),
    "select": ("select", "select"),
    "LayerMap": ("layermap", "LayerMap"),
    "LayerEntry": ("layermap", "LayerEntry"),
    "prune": ("prune", "prune"),
    "replace": ("replace", "replace"),
    "evaluate": ("evaluate", "evaluate"),
    "Engine": ("engine", "Engine"),
    "generate": ("engine", "generate"),
}


class _Package(_types.ModuleType):
    def __getattr__(self, name):
        if name not in _LAZY:
            raise AttributeError(f"module 'shortrt' has no attribute {name!r}")
        module, attr = _LAZY[name]
        value = getattr(_importlib.import_module(f"{__name__}.{module}"), attr)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, _types.ModuleType):
            return  # the import system binding a submodule: keep the function of that name
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
for _name in [n for n in _LAZY if n in globals()]:
    del globals()[_name]  # a submodule bound before the class switch

__all__ = [
    "load", "Model", "calibrate", "Scores", "select", "LayerMap", "LayerEntry", "prune",
    "evaluate", "Engine", "generate", "replace",
    "ShortrtError", "CheckpointError", "MissingDependencyError",
]
