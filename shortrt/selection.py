"""Choose which layers to remove from calibration scores: `select(scores, remove=N, method=...)`.

Methods (N = number removed, L = number of layers):

- ``shortgpt``: the N layers with the lowest Block Influence (ShortGPT, Men et al. 2024).
- ``span``: the contiguous span of N layers whose input h_start and output h_{start+N} are
  closest in angular distance (LLM-Streamline, Chen et al. 2024; Gromov et al. 2024).
- ``attention``: the N attention sublayers with the lowest attention BI; their layers keep the
  MLP (He et al. 2024, "What Matters in Transformers?").
- ``last``: the N layers just before the final one (layers L-1-N .. L-2), keeping the final
  layer. This is the strong form of the "prune from the back" baseline (Gromov et al. keep
  the final layer too): the final layer writes the state the unembedding reads and is among
  the most influential, so dropping it as well (ShortGPT's "reverse-order" baseline) mostly
  measures that one layer's loss and makes a weaker, less informative baseline.
- ``random``: N layers drawn uniformly with a seeded generator.

Iterative removal (one layer per round, recalibrating in between) needs the model, not one set of
scores: it is shortrt.iterative.iterative_select.
"""
from __future__ import annotations

import json
import math
import os
import random as _random
from pathlib import Path

from .layermap import LayerMap, _index

METHODS = ("shortgpt", "span", "attention", "last", "random")
# Which score lists each method needs (random and last need only the layer count).
_NEEDS = {"shortgpt": "bi", "span": "span_angular", "attention": "attn_bi"}
_PER_LAYER = ("bi", "angular", "attn_bi", "mlp_bi")


def _field(scores, name: str):
    if isinstance(scores, dict):
        return scores.get(name)
    return getattr(scores, name, None)


def _as_scores(scores):
    if isinstance(scores, (str, os.PathLike)):
        path = Path(scores)
        if not path.is_file():
            raise FileNotFoundError(f"scores file not found: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a valid scores JSON file: {exc}") from None
    return scores


def count_to_remove(num_layers: int, remove=None, ratio=None) -> int:
    """The number of layers to remove from exactly one of `remove` (a count) or `ratio` (0..1)."""
    if (remove is None) == (ratio is None):
        raise ValueError("give exactly one of remove=N (a layer count) or ratio=R (a fraction of the layers)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ValueError(f"ratio must be a number between 0 and 1, got {ratio!r}")
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        n = int(round(ratio * num_layers))
    else:
        n = _index(remove, "remove")
    if n < 0:
        raise ValueError(f"cannot remove a negative number of layers ({n})")
    if n >= num_layers:
        raise ValueError(f"cannot remove {n} of {num_layers} layers: at least one layer must remain")
    return n


def _per_layer(scores, name: str, num_layers: int, method: str) -> list[float]:
    data = _field(scores, "data")
    kinds = data.get("score_kinds") if isinstance(data, dict) else None
    if isinstance(kinds, list) and name not in kinds:  # a family without this score (Mamba: no sublayers)
        raise ValueError(f"method {method!r} needs the {name!r} scores, which a {data.get('architecture', 'model')} "
                         f"does not have (its scores: {', '.join(map(str, kinds))}); a Mamba block has one mixer "
                         "and no attention or MLP sublayer: use shortgpt, span, last or random")
    values = _field(scores, name)
    if values is None or len(values) == 0:
        raise ValueError(f"method {method!r} needs the {name!r} scores, which these scores do not have; "
                         "recompute them with shortrt.calibrate")
    if len(values) != num_layers:
        raise ValueError(f"scores {name!r} has {len(values)} values but the model has {num_layers} layers")
    values = [float(v) for v in values]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"scores {name!r} are not finite at layers {bad}")
    return values


def _lowest(values: list[float], n: int) -> list[int]:
    # Ties go to the lower index, so the choice is deterministic.
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:n])


def _best_span(scores, n: int, num_layers: int) -> tuple[int, float]:
    table = _field(scores, "span_angular")
    if table is None or len(table) == 0:
        raise ValueError("method 'span' needs the 'span_angular' scores (the depth x depth table), "
                         "which these scores do not have; recompute them with shortrt.calibrate")
    max_span = _field(scores, "max_span")
    if max_span is None:
        max_span = min(len(row) for row in table)
    if n > max_span:
        raise ValueError(f"method 'span' cannot remove {n} layers: the scores hold spans of at most "
                         f"{max_span} layers (calibrate with a larger max_span)")
    best = None
    for start in range(num_layers - n + 1):
        if start >= len(table) or len(table[start]) < n:
            continue
        d = table[start][n - 1]
        if d is None or not math.isfinite(float(d)):
            continue
        if best is None or float(d) < best[1]:
            best = (start, float(d))
    if best is None:
        raise ValueError(f"the scores have no finite span distance for spans of {n} layers")
    return best


def select(scores, *, remove=None, ratio=None, method: str = "shortgpt", seed: int = 0) -> LayerMap:
    """A LayerMap removing `remove` layers (or round(ratio * L)) chosen by `method`.

    scores: a shortrt.calibration.Scores, its JSON as a dict, or the path of a saved scores file.
    With method="attention" the layers stay and only their attention sublayers go. "last" keeps
    the final layer and removes the N before it (see the module docstring for why).
    """
    scores = _as_scores(scores)
    if method == "iterative":
        raise ValueError("method 'iterative' recalibrates the model after each removal, so it needs the model, "
                         "not scores: use shortrt.iterative_select(model, remove=N)")
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    num_layers = _field(scores, "num_layers")
    if num_layers is None:
        bi = _field(scores, "bi")
        if bi is None:
            raise ValueError("the scores say neither num_layers nor per-layer 'bi'")
        num_layers = len(bi)
    num_layers = _index(num_layers, "scores num_layers")
    n = count_to_remove(num_layers, remove, ratio)

    extra = {"scores": _score_record(scores, method, num_layers),
             "calibration": _calibration_record(scores), "source": _field(scores, "model")}
    if method == "shortgpt":
        removed = _lowest(_per_layer(scores, "bi", num_layers, method), n)
    elif method == "attention":
        chosen = _lowest(_per_layer(scores, "attn_bi", num_layers, method), n)
        return LayerMap.from_removed_attention(num_layers, chosen, method=method, **extra)
    elif method == "span":
        if n == 0:
            removed = []
        else:
            start, distance = _best_span(scores, n, num_layers)
            removed = list(range(start, start + n))
            extra["scores"]["span"] = {"start": start, "length": n, "angular": distance}
    elif method == "last":
        removed = list(range(num_layers - 1 - n, num_layers - 1))
    else:  # random
        seed = _index(seed, "seed")
        removed = sorted(_random.Random(seed).sample(range(num_layers), n))
        extra["scores"]["seed"] = seed
    return LayerMap.from_removed(num_layers, removed, method=method, **extra)


def _score_record(scores, method: str, num_layers: int) -> dict:
    """The per-layer scores kept in shortrt.json (the span table is left in the scores file)."""
    record = {"metric": _NEEDS.get(method, "none")}
    for name in _PER_LAYER:
        values = _field(scores, name)
        # A kind the family lacks (Mamba's attn_bi, mlp_bi: null in the file, NaN in memory) is left out.
        if values is not None and len(values) == num_layers and \
                all(v is not None and math.isfinite(float(v)) for v in values):
            record[name] = [float(v) for v in values]
    return record


def _calibration_record(scores) -> dict | None:
    data = _field(scores, "data")
    return dict(data) if isinstance(data, dict) else None
