"""Remove layers from a GGUF file, so llama.cpp can run the same pruned model as shortrt.

A GGUF stores a Llama's layers as `blk.{i}.*` tensors and their count as
`<arch>.block_count`. Plain layer removal maps onto that directly: copy the
retained blocks' tensors (in whatever quantization they have) renumbered
0..k-1, and lower the count. Maps with attention-less or replacement layers have
no GGUF equivalent and are refused.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_SKIP_FIELDS = ("GGUF.",)  # written by GGUFWriter itself


def prune_gguf(src, retained: list[int], dst, *, overwrite: bool = False) -> Path:
    """Write `dst`: `src` with only the blocks in `retained` (original indices, in order)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    count_key = f"{arch}.block_count"
    n_blocks = int(reader.fields[count_key].contents())
    if not retained:
        raise ValueError("retained is empty: at least one block must remain")
    bad = [i for i in retained if not 0 <= i < n_blocks]
    if bad:
        raise ValueError(f"block indices {bad} out of range for {src.name} ({n_blocks} blocks)")
    if len(set(retained)) != len(retained):
        raise ValueError(f"retained has duplicate blocks: {retained}")
    new_index = {old: new for new, old in enumerate(retained)}

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".tmp-", dir=dst.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        for name, field in reader.fields.items():
            if name.startswith(_SKIP_FIELDS) or name == "general.architecture":
                continue
            vtype = field.types[0]
            value = len(retained) if name == count_key else field.contents()
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            m = _BLOCK.match(t.name)
            if m:
                old = int(m.group(1))
                if old not in new_index:
                    continue
                name = f"blk.{new_index[old]}.{m.group(2)}"
            else:
                name = t.name
            # t.data is already in numpy order: elements for float types, bytes per row for
            # quantized blocks (the writer converts a byte shape back to elements itself).
            writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
