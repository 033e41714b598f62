"""Exceptions shortrt raises for bad input. Each message names the problem and the fix."""


class ShortrtError(Exception):
    """Base class of shortrt's own errors."""


class MissingDependencyError(ShortrtError):
    """An optional package or file that the operation needs is not installed."""


class CheckpointError(ShortrtError, ValueError):
    """A checkpoint directory or file is missing, corrupt, or contradicts its config."""


class DeviceUnavailableError(ShortrtError):
    """The device asked for (--device cuda) is not usable here: no GPU, no CUDA build of torch, or
    a GPU without what the engine needs. Raised before anything is loaded; the CLI exits with 2."""

    exit_code = 2
