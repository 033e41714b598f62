"""What every Triton kernel module shares: the optional import, the backend choice, the interpreter test.

Triton is optional. Without it every kernel module still imports and runs its torch reference. On a
machine without a GPU the kernels run only in Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported: ``triton.jit`` decides between compiled and
interpreted functions when a function is defined, and triton's own jit'd builtins are defined at its
import. The interpreter runs programs one after another through numpy and keeps bf16 as raw 16-bit
patterns, so every kernel casts what it loads to fp32 right after ``tl.load`` (and computes in fp32).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch paths need nothing else
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch")


class KernelUnavailableError(RuntimeError):
    """The Triton backend was asked for where it cannot run (callers turn it into their own error)."""


if triton is not None:

    @triton.jit
    def _probe_kernel(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr))


def triton_interpreted() -> bool:
    """True if Triton and shortrt's kernels were both set up for Triton's CPU interpreter.

    Triton's own jit'd builtins (tl.sum, tl.zeros) are fixed when triton is first imported, so
    TRITON_INTERPRET=1 set after that import is not enough: check them as well as a kernel of ours.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)


def require_triton(device: torch.device) -> None:
    """Raise KernelUnavailableError, saying what to do, unless the Triton kernels can run on `device`."""
    if triton is None:
        raise KernelUnavailableError("backend='triton' needs the triton package: pip install 'triton==3.9.*'")
    if device.type == "cpu" and not triton_interpreted():
        raise KernelUnavailableError(
            "backend='triton' on CPU tensors runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (transformers imports it too), "
            "or use backend='torch'"
        )
    if device.type not in ("cpu", "cuda"):
        raise KernelUnavailableError(f"backend='triton' runs on CUDA (or interpreted on the CPU), not on {device.type}")


def choose_backend(kernel: str, backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for `backend` ('auto' | 'triton' | 'torch') and tensors on `device`.

    auto: triton for CUDA tensors, or for CPU tensors when triton is interpreted; torch otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {kernel} backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if triton is None:
            return "torch"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return "triton"
        return "torch"
    if backend == "triton":
        require_triton(device)
    return backend


def interpreted(device: torch.device) -> bool:
    """Whether a launch on `device` runs in the interpreter (the launchers pick smaller, fp32 tiles there)."""
    return device.type == "cpu"


ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def check_dtype(kernel: str, what: str, t: torch.Tensor, allowed=ACTIVATION_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{kernel}: {what} must be a torch tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{kernel}: {what} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(kernel: str, what: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` holds ints or None (any size)."""
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{kernel}: {what} must have shape {want}, got {list(t.shape)}")


def check_kv_caches(kernel: str, k_cache: torch.Tensor, v_cache: torch.Tensor, *, n_kv_heads=None,
                    head_dim=None) -> tuple[int, int, int, int]:
    """The compact KV cache pair every decode kernel takes: contiguous [R, nkv, S, hd] tensors of one
    dtype and shape (nkv / hd checked when given); returns (R, nkv, S, hd)."""
    check_dtype(kernel, "k_cache", k_cache)
    heads = "nkv" if n_kv_heads is None else n_kv_heads
    want = f"[R, {heads}, S, {'hd' if head_dim is None else f'hd = {head_dim}'}]"
    if (k_cache.dim() != 4 or (n_kv_heads is not None and k_cache.shape[1] != n_kv_heads)
            or (head_dim is not None and k_cache.shape[3] != head_dim)):
        raise ValueError(f"{kernel}: k_cache must be {want}, got {list(k_cache.shape)}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{kernel}: v_cache ({list(getattr(v_cache, 'shape', []))}, {getattr(v_cache, 'dtype', None)})"
                         f" must match k_cache ({list(k_cache.shape)}, {k_cache.dtype})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{kernel}: the caches must be contiguous")
    return tuple(k_cache.shape)


def check_same_device(kernel: str, **tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{kernel}: all tensors must be on one device, got {first} and {dev} ({name})")
    return first
