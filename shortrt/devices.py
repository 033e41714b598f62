"""Where torch work runs: the one place a `--device` / `device=` argument is checked.

    from shortrt.devices import resolve_device
    dev = resolve_device("cuda")   # torch.device("cuda", 0), or ShortrtError before anything is loaded

Accepted: "cpu", "cuda", "cuda:N" (or a torch.device of those types). A CUDA device that cannot be
used is refused with the reason: torch built without CUDA, no driver or device visible, an index
past the devices present. Calibration, replacement training and healing call this before they load
a model, so a wrong device costs nothing.
"""
from __future__ import annotations

from .errors import ShortrtError

DEVICE_CHOICES = "cpu, cuda or cuda:N"


def resolve_device(device="cpu"):
    """torch.device for `device`, checked usable now; ShortrtError naming the problem otherwise."""
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise ShortrtError(f"device must be a string ({DEVICE_CHOICES}), got {type(device).__name__}")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ShortrtError(f"unknown device {device!r}; choose {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ShortrtError(f"unknown device {device!r}; choose {DEVICE_CHOICES}")
    _require_cuda(name, dev.index)
    return torch.device("cuda", dev.index or 0)


def _require_cuda(name: str, index) -> None:
    import torch

    if torch.version.cuda is None:
        raise ShortrtError(f"device {name!r}: this torch ({torch.__version__}) was built without CUDA; "
                           "install a CUDA build of torch, or use --device cpu")
    if not torch.cuda.is_available():
        raise ShortrtError(f"device {name!r}: no usable CUDA GPU (torch.cuda.is_available() is False: "
                           "no driver or no visible device; check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ShortrtError(f"device {name!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                           f"device{'s' * (count != 1)} (cuda:0..cuda:{count - 1})")


def is_cuda(device) -> bool:
    return getattr(device, "type", device) == "cuda"


def work_dtype(device):
    """The dtype a frozen model runs in on `device`: bf16 on a GPU (half the bytes, tensor cores),
    fp32 on the CPU (where the reference numbers come from)."""
    import torch

    return torch.bfloat16 if is_cuda(device) else torch.float32
