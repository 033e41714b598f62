"""The layer map: which original layers a checkpoint runs, in what order, with which sublayers.

It is the data of `shortrt.json` (format "shortrt.layermap/1", see docs/internals.md); reading
and writing the file is shortrt.checkpoint's job.
Entry i describes the checkpoint's `model.layers.{i}.*`; `source` is the original layer index
it came from (a list for a replacement standing in for a span). An attention-less entry has no
KV slot, so `num_attention` is the number of KV slots the runtime allocates.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

FORMAT = "shortrt.layermap/1"
KINDS = ("layer", "layer_replacement", "mlp_replacement")


def _index(value, what: str) -> int:
    """`value` as a plain int; bools and floats (even 3.0) are rejected: a layer index is a count."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


@dataclass
class LayerEntry:
    source: int | list[int]
    kind: str = "layer"
    attention: bool = True
    mlp: bool = True

    def to_json(self) -> dict:
        source = list(self.source) if isinstance(self.source, (list, tuple)) else self.source
        return {"source": source, "kind": self.kind, "attention": self.attention, "mlp": self.mlp}

    @property
    def sources(self) -> list[int]:
        """The original layer indices this entry stands for (one for a plain layer)."""
        return list(self.source) if isinstance(self.source, (list, tuple)) else [self.source]


@dataclass
class LayerMap:
    source_num_layers: int
    layers: list[LayerEntry]
    method: str
    removed: list[int] = field(default_factory=list)
    scores: dict | None = None
    calibration: dict | None = None
    replacement: dict | None = None
    source: str | None = None
    healing: dict | None = None  # the record of `shortrt.heal` (docs/internals.md), None if never healed
    budget: dict | None = None  # the budget `shortrt prune --target-speedup ...` met (shortrt.budget), if any

    def __post_init__(self):
        self.validate()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int, *, method: str = "dense", source: str | None = None) -> "LayerMap":
        """Every layer, with attention and MLP: what a checkpoint without shortrt.json runs."""
        num_layers = _index(num_layers, "num_layers")
        return cls(num_layers, [LayerEntry(i) for i in range(num_layers)], method, [], source=source)

    @classmethod
    def from_removed(cls, num_layers: int, removed, *, method: str = "manual", **extra) -> "LayerMap":
        """Remove the listed original layers; every other layer is kept whole, in order."""
        num_layers = _index(num_layers, "num_layers")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        removed = [_index(i, "removed layer index") for i in removed]
        _check_indices(removed, num_layers, "removed layer")
        if len(set(removed)) == num_layers:
            raise ValueError(f"cannot remove all {num_layers} layers: at least one must remain")
        gone = set(removed)
        layers = [LayerEntry(i) for i in range(num_layers) if i not in gone]
        return cls(num_layers, layers, method, sorted(gone), **extra)

    @classmethod
    def from_removed_attention(cls, num_layers: int, removed_attention, *, method: str = "attention",
                               **extra) -> "LayerMap":
        """Keep every layer but drop the attention sublayer of the listed ones (their MLPs stay)."""
        num_layers = _index(num_layers, "num_layers")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        removed_attention = [_index(i, "attention layer index") for i in removed_attention]
        _check_indices(removed_attention, num_layers, "attention layer")
        gone = set(removed_attention)
        layers = [LayerEntry(i, attention=i not in gone) for i in range(num_layers)]
        return cls(num_layers, layers, method, [], **extra)

    # ---- views --------------------------------------------------------------------------
    @property
    def retained(self) -> list[int]:
        """Source indices of the plain (kind "layer") entries, in checkpoint order."""
        return [e.source for e in self.layers if e.kind == "layer"]

    @property
    def num_attention(self) -> int:
        """KV slots: entries that keep their attention."""
        return sum(1 for e in self.layers if e.attention)

    @property
    def removed_attention(self) -> list[int]:
        """Source indices of plain layers kept without their attention."""
        return [e.source for e in self.layers if e.kind == "layer" and not e.attention]

    @property
    def is_dense(self) -> bool:
        return (len(self.layers) == self.source_num_layers and not self.removed
                and all(e.kind == "layer" and e.attention and e.mlp and e.source == i
                        for i, e in enumerate(self.layers)))

    @property
    def transformers_compatible(self) -> bool:
        """True when every entry is a full decoder layer, so plain transformers can run it."""
        return all(e.attention and e.mlp for e in self.layers)

    def describe(self) -> str:
        parts = [f"{self.method}: {len(self.layers)} of {self.source_num_layers} layers"]
        if self.removed:
            parts.append(f"removed {self.removed}")
        if self.removed_attention:
            parts.append(f"attention removed in {self.removed_attention}")
        return ", ".join(parts)

    # ---- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        n = _index(self.source_num_layers, "source_num_layers")
        if n < 1:
            raise ValueError(f"source_num_layers must be at least 1, got {n}")
        if not self.layers:
            raise ValueError("a layer map must keep at least one layer")
        seen: set[int] = set()
        for pos, e in enumerate(self.layers):
            if not isinstance(e, LayerEntry):
                raise ValueError(f"layer entry {pos} is {type(e).__name__}, not LayerEntry")
            if e.kind not in KINDS:
                raise ValueError(f"layer entry {pos} has unknown kind {e.kind!r}; expected one of {KINDS}")
            if e.kind == "layer" and isinstance(e.source, (list, tuple)):
                raise ValueError(f"layer entry {pos} is a plain layer but its source is a list {e.source}")
            if not e.attention and not e.mlp:
                raise ValueError(f"layer entry {pos} has neither attention nor MLP: remove it instead")
            sources = e.sources
            _check_indices(sources, n, f"layer entry {pos} source")
            again = seen.intersection(sources)
            if again:
                raise ValueError(f"original layer {sorted(again)[0]} appears in more than one entry")
            seen.update(sources)
        removed = [_index(i, "removed layer index") for i in self.removed]
        _check_indices(removed, n, "removed layer")
        if seen.intersection(removed):
            raise ValueError(f"layers {sorted(seen.intersection(removed))} are both kept and removed")
        lost = sorted(set(range(n)) - seen - set(removed))
        if lost:
            raise ValueError(f"original layers {lost} are neither kept nor listed in 'removed'")

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {
            "format": FORMAT,
            "source": self.source,
            "source_num_layers": self.source_num_layers,
            "method": self.method,
            "layers": [e.to_json() for e in self.layers],
            "removed": list(self.removed),
        }
        for key in ("scores", "calibration", "replacement", "healing", "budget"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LayerMap":
        """Parse the JSON form with the checkpoint contract's rules (shortrt.checkpoint.parse_layer_map)."""
        from .checkpoint import parse_layer_map

        return parse_layer_map(d)

    # ---- composition --------------------------------------------------------------------
    def then(self, inner: "LayerMap") -> "LayerMap":
        """The map of pruning a checkpoint made by `self` again with `inner`.

        `inner` indexes this map's entries (its source_num_layers must equal len(self.layers));
        the result indexes the original model, so shortrt.json stays relative to the source.
        """
        if inner.source_num_layers != len(self.layers):
            raise ValueError(
                f"the new layer map is for {inner.source_num_layers} layers but the checkpoint has "
                f"{len(self.layers)}")
        layers = []
        for e in inner.layers:
            if e.kind != "layer":
                raise ValueError("composing replacement entries is not supported")
            outer = copy.deepcopy(self.layers[e.source])
            outer.attention = outer.attention and e.attention
            outer.mlp = outer.mlp and e.mlp
            layers.append(outer)
        removed = set(self.removed)
        for i in inner.removed:
            removed.update(self.layers[i].sources)
        return LayerMap(self.source_num_layers, layers, f"{self.method}+{inner.method}", sorted(removed),
                        scores=inner.scores, calibration=inner.calibration,
                        replacement=self.replacement, healing=self.healing, budget=inner.budget, source=self.source)


def _check_indices(indices: list[int], num_layers: int, what: str) -> None:
    for i in indices:
        if not 0 <= i < num_layers:
            raise ValueError(f"{what} index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1})")
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup:
        raise ValueError(f"{what} indices are repeated: {dup}")


def layer_map_of(model) -> LayerMap:
    """The layer map a checkpoint runs: its shortrt.json, or every layer when it has none."""
    from .checkpoint import load

    return load(model, runtime=False).layer_map  # reading it runs nothing: Mamba too
