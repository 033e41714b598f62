"""A reader for R's binary data files, enough to get character vectors out of an R package.

R writes objects with its serialization format (XDR, big-endian: a 32-bit flags word per object
giving its type, then its payload, then its attributes). Files that hold it:

* ``.rds``  one serialized object, usually gzip-compressed (also bzip2, xz or none);
* ``.rda``  ``RDX2\\n`` or ``RDX3\\n`` then a pairlist of name -> object (``save()``), compressed;
* ``.rdb`` + ``.rdx``  a lazy-load database, which is how an installed package (the Debian
  ``r-cran-*`` packages) stores its data: the ``.rdx`` index (an .rds) maps each name to
  (offset, length) in the ``.rdb``, whose record is a 4-byte big-endian uncompressed size and a
  zlib stream, or, when the index says compressed = 2 or 3, a type byte then bzip2 / xz / raw.

Vectors, lists, pairlists, symbols and attributes are decoded; byte code, external pointers,
S4 objects and the like raise RDataError, since shortrt only needs text.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShortrtError


class RDataError(ShortrtError, ValueError):
    """An R data file is corrupt or uses a feature this reader does not decode."""


@dataclass
class RObject:
    """An R value: kind is R's typeof() ("character", "list", "integer", "pairlist", ...)."""

    kind: str
    values: list = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    tags: list | None = None  # pairlists: the tag (name) of each element

    @property
    def names(self) -> list[str] | None:
        if self.tags is not None:
            return self.tags
        names = self.attributes.get("names")
        return list(names.values) if isinstance(names, RObject) else None

    def as_dict(self) -> dict[str, Any]:
        """A named list or pairlist as {name: value}."""
        names = self.names
        if names is None or len(names) != len(self.values):
            raise RDataError(f"R {self.kind} has no names for its {len(self.values)} elements")
        return dict(zip(names, self.values))


@dataclass(frozen=True)
class RSymbol:
    name: str


# SEXP type codes (R's Rinternals.h) and the serializer's pseudo-types (serialize.c).
_VECTOR_KINDS = {10: "logical", 13: "integer", 14: "double", 15: "complex", 16: "character",
                 19: "list", 20: "expression", 24: "raw"}
_PAIRLIST_KINDS = {2: "pairlist", 6: "language", 17: "dots", 3: "closure", 5: "promise"}
_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUNDVALUE, _MISSINGARG, _BASENAMESPACE = (
    254, 242, 241, 253, 252, 251, 250)
_REFSXP, _PERSISTSXP, _NAMESPACESXP, _PACKAGESXP, _ENVSXP, _SYMSXP, _CHARSXP = (
    255, 247, 249, 248, 4, 1, 9)
_ATTRLANGSXP, _ATTRLISTSXP, _ALTREP_SXP = 240, 239, 238
_NA_INTEGER = -(2 ** 31)
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


class _Unserializer:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []  # symbols and environments, referenced later by index

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(f"R data truncated: needed {n} bytes at offset {self.pos} of {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: length as two 32-bit halves
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise RDataError(f"R data has a negative vector length {n}")
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise RDataError(f"only R's XDR serialization is supported, got format {fmt!r}")
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        sexptype = flags & 0xFF
        if sexptype == _NILVALUE:
            return None
        if sexptype in (_EMPTYENV, _BASEENV, _GLOBALENV, _BASENAMESPACE):
            return RObject("environment")
        if sexptype in (_UNBOUNDVALUE, _MISSINGARG):
            return None
        if sexptype == _REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"R data refers to object {index} of {len(self.refs)}")
            return self.refs[index - 1]
        if sexptype == _PERSISTSXP:
            self.int()  # a STRSXP header holding the persistent name
            obj = RObject("persistent", [self.charsxp() for _ in range(self.length())])
            self.refs.append(obj)
            return obj
        if sexptype in (_NAMESPACESXP, _PACKAGESXP):
            self.int()
            obj = RObject("environment", [self.charsxp() for _ in range(self.length())])
            self.refs.append(obj)
            return obj
        if sexptype == _SYMSXP:
            sym = RSymbol(self.item())
            self.refs.append(sym)
            return sym
        if sexptype == _ENVSXP:
            env = RObject("environment")
            self.refs.append(env)  # registered before its contents, which may refer to it
            self.int()  # locked
            enclosure, frame, hashtab, attributes = self.item(), self.item(), self.item(), self.item()
            env.attributes = {"enclosure": enclosure, "frame": frame, "hashtab": hashtab,
                              "attributes": attributes}
            return env
        if sexptype == _CHARSXP:
            return self.charsxp_body(flags)
        if sexptype in _PAIRLIST_KINDS or sexptype in (_ATTRLANGSXP, _ATTRLISTSXP):
            return self.pairlist(flags)
        if sexptype in _VECTOR_KINDS:
            obj = RObject(_VECTOR_KINDS[sexptype], self.vector_values(sexptype))
            if flags & _HAS_ATTR:
                obj.attributes = self.attributes()
            return obj
        if sexptype == _ALTREP_SXP:
            return self.altrep()
        raise RDataError(f"R object of SEXP type {sexptype} is not supported (shortrt reads text data only)")

    def charsxp(self) -> str | None:
        flags = self.int()
        if flags & 0xFF != _CHARSXP:
            raise RDataError(f"expected a string (CHARSXP) in R data, got SEXP type {flags & 0xFF}")
        return self.charsxp_body(flags)

    def charsxp_body(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        latin1 = flags & (1 << (12 + 2))  # LATIN1_MASK in the "levels" field
        return raw.decode("latin-1" if latin1 else "utf-8", errors="replace")

    def vector_values(self, sexptype: int) -> list:
        n = self.length()
        if sexptype == 16:
            return [self.charsxp() for _ in range(n)]
        if sexptype in (19, 20):
            return [self.item() for _ in range(n)]
        if sexptype in (10, 13):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            return [None if v == _NA_INTEGER else (bool(v) if sexptype == 10 else v) for v in ints]
        if sexptype == 14:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if sexptype == 15:
            pairs = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(pairs[2 * i], pairs[2 * i + 1]) for i in range(n)]
        return list(self.take(n))  # raw

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject) or attrs.tags is None:
            raise RDataError("R attributes are not a tagged pairlist")
        return {tag: value for tag, value in zip(attrs.tags, attrs.values)}

    def pairlist(self, flags: int) -> RObject:
        kind = _PAIRLIST_KINDS.get(flags & 0xFF, "pairlist" if flags & 0xFF == _ATTRLISTSXP else "language")
        obj = RObject(kind, [], {}, [])
        # A pairlist is a chain of cells (attributes?, tag?, car, cdr): walk the cdr iteratively.
        while True:
            if flags & _HAS_ATTR:
                obj.attributes.update(self.attributes())
            tag = self.item() if flags & _HAS_TAG else None
            obj.tags.append(tag.name if isinstance(tag, RSymbol) else tag)
            obj.values.append(self.item())
            flags = self.int()
            sexptype = flags & 0xFF
            if sexptype == _NILVALUE:
                return obj
            if sexptype not in _PAIRLIST_KINDS and sexptype not in (_ATTRLANGSXP, _ATTRLISTSXP):
                self.pos -= 4  # a dotted pair ends in a non-list cdr: keep it as the last value
                obj.values.append(self.item())
                obj.tags.append(None)
                return obj

    def altrep(self) -> RObject:
        info, state, attributes = self.item(), self.item(), self.item()
        class_name = info.values[0].name if isinstance(info, RObject) and info.values else "?"
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = state.values[:3]
            values = [start + i * step for i in range(int(n))]
            obj = RObject("integer" if class_name == "compact_intseq" else "double", values)
        elif class_name.startswith("wrap_"):
            obj = state.values[0]  # (wrapped vector, metadata)
        elif class_name == "deferred_string":
            obj = RObject("character", [str(v) for v in state.values[0].values])
        else:
            raise RDataError(f"R ALTREP class {class_name!r} is not supported")
        if isinstance(attributes, RObject) and attributes.tags is not None:
            obj.attributes = dict(zip(attributes.tags, attributes.values))
        return obj


def decompress(data: bytes) -> bytes:
    """Undo gzip, bzip2 or xz compression, recognised by magic number; other bytes pass through."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise RDataError(f"corrupt compressed R data: {exc}") from exc
    return data


def unserialize(data: bytes) -> Any:
    """Decode one serialized R object (starting with its b"X\\n" header)."""
    reader = _Unserializer(data)
    reader.header()
    return reader.item()


def read_rds(path: str | Path) -> Any:
    """The object in an .rds file."""
    return unserialize(decompress(Path(path).read_bytes()))


def read_rda(path: str | Path) -> dict[str, Any]:
    """The objects saved in an .rda / .RData file, by name."""
    data = decompress(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RDataError(f"{path} is not an R data file (expected an RDX2/RDX3 header, got {data[:5]!r})")
    objects = unserialize(data[5:])
    if not isinstance(objects, RObject):
        raise RDataError(f"{path} holds no objects")
    return objects.as_dict()


def _lazyload_record(record: bytes, compression: int) -> bytes:
    if len(record) < 5:
        raise RDataError("truncated record in an R lazy-load database")
    size = struct.unpack(">I", record[:4])[0]
    try:
        if compression in (2, 3):
            kind, payload = record[4:5], record[5:]
            if kind == b"0":
                data = payload
            elif kind == b"1":
                data = zlib.decompress(payload)
            elif kind == b"2":
                data = bz2.decompress(payload)
            elif kind == b"Z":
                data = lzma.decompress(payload)
            else:
                raise RDataError(f"unknown compression {kind!r} in an R lazy-load database")
        else:
            data = zlib.decompress(record[4:])
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RDataError(f"corrupt record in an R lazy-load database: {exc}") from exc
    if len(data) != size:
        raise RDataError(f"R lazy-load record decompressed to {len(data)} bytes, its header says {size}")
    return data


def read_lazyload_db(rdx_path: str | Path) -> dict[str, Any]:
    """The objects of an R lazy-load database (``name.rdx`` with ``name.rdb`` beside it), by name."""
    rdx_path = Path(rdx_path)
    index = read_rds(rdx_path)
    if not isinstance(index, RObject) or index.kind != "list":
        raise RDataError(f"{rdx_path} is not a lazy-load index (expected an R list)")
    entries = index.as_dict()
    compressed = entries.get("compressed")
    compression = int(compressed.values[0]) if isinstance(compressed, RObject) and compressed.values else 1
    blob = rdx_path.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, key in entries["variables"].as_dict().items():
        offset, length = (int(v) for v in key.values[:2])
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise RDataError(f"{rdx_path}: record {name!r} at {offset}+{length} lies outside the .rdb")
        objects[name] = unserialize(_lazyload_record(blob[offset:offset + length], compression))
    return objects
