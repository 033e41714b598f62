"""Where torch work runs: the one place a `--device` / `device=` argument is checked.

    from shortrt.devices import resolve_device
    dev = resolve_device("cuda")   # torch.device("cuda", 0), or ShortrtError before anything is loaded

Accepted: "cpu", "cuda", "cuda:N" (or a torch.device of those types). A CUDA device that cannot be
used is refused with the reason: torch built without CUDA, no driver or device visible, an index
past the devices present. The GPU engine, calibration, replacement training and healing call this
before they load a model, so a wrong device costs nothing.
"""
from __future__ import annotations

from .errors import DeviceUnavailableError, ShortrtError

DEVICE_CHOICES = "cpu, cuda or cuda:N"


class UnknownDeviceError(ShortrtError, ValueError):
    """A device name that is neither cpu nor cuda[:N]."""


def resolve_device(device="cpu"):
    """torch.device for `device`, checked usable now. An unknown name is a ValueError (a
    ShortrtError); a CUDA device that cannot be used a DeviceUnavailableError (the CLI's exit code 2)."""
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise UnknownDeviceError(f"device must be a string ({DEVICE_CHOICES}), got {type(device).__name__}")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UnknownDeviceError(f"unknown device {device!r}; choose {DEVICE_CHOICES}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of torch"
    elif not torch.cuda.is_available():
        why = ("no usable CUDA GPU (torch.cuda.is_available() is False: no driver or no visible device; "
               "check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    elif (dev.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        why = f"torch sees {count} CUDA device{'s' * (count != 1)} (cuda:0..cuda:{count - 1})"
    else:
        return torch.device("cuda", dev.index or 0)
    raise DeviceUnavailableError(f"device {name!r} is not usable: {why}; without a GPU use --device cpu")


def is_cuda(device) -> bool:
    return getattr(device, "type", device) == "cuda"


def work_dtype(device):
    """The dtype a frozen model runs in on `device`: bf16 on a GPU (half the bytes, tensor cores),
    fp32 on the CPU (where the reference numbers come from)."""
    import torch

    return torch.bfloat16 if is_cuda(device) else torch.float32
