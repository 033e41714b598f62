"""Write safetensors files one tensor at a time, so pruning never holds a whole model in memory.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and [begin, end) byte range in the data section, then the data. The header is known
before any tensor is read (dtype and shape come from the source file's header), so it is
written first and each tensor's bytes follow as they are loaded.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class TensorSource:
    """A tensor to write: its name, safetensors dtype string, shape, and how to get its bytes:
    `read()` returns them whole (bytes) or as an iterable of pieces (a streaming copy)."""
    name: str
    dtype: str
    shape: list[int]
    read: Callable[[], bytes | Iterable[bytes]]

    def pieces(self) -> Iterator[bytes]:
        data = self.read()
        if isinstance(data, (bytes, bytearray, memoryview)):
            yield data
        else:
            yield from data

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def tensor_bytes(t, dtype: str) -> bytes:
    """The raw bytes of torch tensor `t` stored as safetensors dtype `dtype` (F32, F16 or BF16)."""
    import torch

    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    return t.detach().to(torch_dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(path: Path, tensors: list[TensorSource], metadata: dict | None = None) -> int:
    """Write `tensors` to `path` in order; returns the bytes of tensor data written."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {t.name!r} has unsupported dtype {t.dtype!r}")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for piece in t.pieces():
                written += len(piece)
                if written > t.nbytes:
                    break
                f.write(piece)
            if written != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: read {written} bytes, header says {t.nbytes}")
    return offset


def write_sharded(out_dir: Path, tensors: list[TensorSource], *, max_shard_bytes: int,
                  metadata: dict | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over `max_shard_bytes`."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], metadata)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / name, shard, metadata)
        names.append(name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
