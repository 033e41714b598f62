"""GGUF tensor encodings shortrt writes: F32, F16, Q8_0, Q4_0 — bit for bit what llama.cpp writes.

Q8_0 and Q4_0 cut each row into blocks of 32 values and store one fp16 scale per block
(ggml/src/ggml-quants.c, quantize_row_q8_0_ref / quantize_row_q4_0_ref, llama.cpp at the commit
vendored by llama-cpp-python 0.3.36, 0c1e57098bba):

    Q8_0 (34 bytes a block): d = amax / 127;  q = roundf(x / d)            (int8, -127..127)
    Q4_0 (18 bytes a block): d = m / -8 where m is the first value of largest |x|;
                             q = min(15, (int8)(x / d + 8.5))              (0..15, two per byte:
                             value j in the low nibble of byte j, value j+16 in its high nibble)

Every step is a float32 operation as in the C code (x / d is x * (1/d), 1/d taken once), the
scale is rounded to fp16 to nearest-even, roundf rounds half away from zero. The C library
itself is used instead when it can be found: llama-cpp-python's bundled libggml-base, or
$SHORTRT_GGML_LIB (a path to libggml-base.so). `encoder()` says which one a file was written with.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

BLOCK = 32
TYPES = ("f32", "f16", "q8_0", "q4_0")
GGML_LIB_ENV = "SHORTRT_GGML_LIB"
_GGML_TYPE = {"q4_0": 2, "q8_0": 8}  # enum ggml_type
_BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n values in `qtype`."""
    if qtype == "f32":
        return 4 * n
    if qtype == "f16":
        return 2 * n
    return n // BLOCK * _BLOCK_BYTES[qtype]


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"rows of {x.shape[-1]} values cannot be cut into blocks of {BLOCK}")
    return x.reshape(-1, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d is 0 (an all-zero block)."""
    out = np.zeros_like(d)
    nz = d != 0
    out[nz] = np.float32(1.0) / d[nz]
    return out


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: half away from zero. |v| + 0.5 is exact in float64 for any float32 v."""
    a = np.abs(v.astype(np.float64))
    return np.copysign(np.floor(a + 0.5), v)


def _pack(d: np.ndarray, qs: np.ndarray, shape: tuple[int, ...], qtype: str) -> np.ndarray:
    scales = d.astype(np.float16).reshape(-1, 1).view(np.uint8)  # little-endian hosts only (x86, arm)
    blocks = np.concatenate([scales, qs.view(np.uint8)], axis=1)
    return blocks.reshape(*shape[:-1], row_bytes(qtype, shape[-1]))


def quantize_q8_0_numpy(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = np.abs(b).max(axis=1) / np.float32(127)
    q = _roundf(b * _inverse(d)[:, None]).astype(np.int8)
    return _pack(d, q, x.shape, "q8_0")


def quantize_q4_0_numpy(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    rows = np.arange(b.shape[0])
    m = b[rows, np.abs(b).argmax(axis=1)]  # argmax: the first of equal maxima, as the C loop's strict <
    d = m / np.float32(-8)
    v = b * _inverse(d)[:, None] + np.float32(8.5)
    q = np.minimum(15, np.trunc(v).astype(np.int8)).astype(np.uint8)
    packed = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)
    return _pack(d, packed, x.shape, "q4_0")


@lru_cache(maxsize=1)
def _ggml():
    """ggml_quantize_chunk from libggml-base, or None: $SHORTRT_GGML_LIB, else llama-cpp-python's copy."""
    path = os.environ.get(GGML_LIB_ENV)
    if not path:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("lib/libggml-base.*"))
        if not found:
            return None
        path = str(found[0])
    try:
        lib = ctypes.CDLL(path)
        fn = lib.ggml_quantize_chunk
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"{path}: cannot load ggml_quantize_chunk from it ({exc})") from None
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    return path, fn


def quantize_ggml(x: np.ndarray, qtype: str) -> np.ndarray:
    """The same encoding by llama.cpp's own C routine (needs the library, see _ggml)."""
    found = _ggml()
    if found is None:
        raise RuntimeError(f"libggml-base not found (install llama-cpp-python or set {GGML_LIB_ENV})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    if n % BLOCK:
        raise ValueError(f"rows of {n} values cannot be cut into blocks of {BLOCK}")
    rows = x.size // n
    out = np.empty((rows, row_bytes(qtype, n)), dtype=np.uint8)
    written = found[1](_GGML_TYPE[qtype], x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def encoder() -> str:
    """Which code quantizes: 'ggml (<library path>)' or 'shortrt numpy'."""
    found = _ggml()
    return f"ggml ({found[0]})" if found else "shortrt numpy"


def encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """x (float32, any shape) in `qtype`: float arrays for f32/f16, uint8 rows of blocks else."""
    if qtype == "f32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "f16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if qtype not in _GGML_TYPE:
        raise ValueError(f"unknown GGUF tensor type {qtype!r} (shortrt writes {', '.join(TYPES)})")
    if _ggml() is not None:
        return quantize_ggml(x, qtype)
    return quantize_q8_0_numpy(x) if qtype == "q8_0" else quantize_q4_0_numpy(x)
