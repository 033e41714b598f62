"""Pruning chosen by a budget: how many layers (or attention sublayers) to remove to reach a decode
speedup, a weight size or a KV-cache size. The selection method still chooses which ones.

    budget = Budget("speedup", 1.3, dtype="int8", threads=2)
    pred = layers_for_budget("default", budget, method="shortgpt", scores="scores.json")
    pruned = shortrt.prune("default", pred.layer_map, "out/fast")
    measured = verify(pred, pruned)           # the real figure, also recorded in shortrt.json

Budgets (one at a time):

- ``speedup``: batch-1 decode tokens/s of the pruned model over the model it is pruned from, at a
  dtype and thread count, on this machine, at the context of shortrt.costs' protocol (greedy
  decode of 128 new tokens after a 16-token prompt: attention cost grows with the context).
- ``weight_bytes``: the weight bytes the runtime holds for the pruned model at that dtype
  (Engine.weight_bytes).
- ``kv_bytes``: its KV cache at max_seq x max_batch (Engine.kv_cache_bytes).

The figures come from shortrt.costs: bytes exactly, time from the runtime's measured cost per
layer and sublayer (cached per checkpoint, dtype, threads and CPU). The count is the fewest
removals whose figure meets the budget (count_for_budget, a pure function of a cost table).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from .checkpoint import Model, load, rewrite_layer_map
from .costs import NEW_TOKENS, PROMPT_TOKENS, Costs, Linear, default_max_seq, kv_table, measure_costs, \
    resolve_threads, weight_table
from .errors import ShortrtError
from .layermap import LayerMap

KINDS = ("speedup", "weight_bytes", "kv_bytes")
OPTIONS = {"speedup": "--target-speedup", "weight_bytes": "--max-weight-bytes", "kv_bytes": "--max-kv-bytes"}


class BudgetError(ShortrtError, ValueError):
    """A budget that no number of removed layers meets (the message says the best reachable figure)."""


@dataclass(frozen=True)
class Budget:
    """kind: "speedup" (value: the ratio to reach), "weight_bytes" or "kv_bytes" (value: the most bytes).

    dtype: weight format of the engine the figure is for; threads: its threads (None = all
    cores; speedup only); max_seq (None = the engine's default context) and max_batch: the KV
    cache a kv_bytes budget is for.
    """
    kind: str
    value: float
    dtype: str = "int8"
    threads: int | None = None
    max_seq: int | None = None
    max_batch: int = 1

    def __post_init__(self):
        from .engine import DTYPES

        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"a {self.kind} budget must be a finite number, got {self.value!r}")
        if self.kind == "speedup" and not self.value > 1:
            raise ValueError(f"a target speedup must be above 1, got {self.value}")
        if self.kind != "speedup" and not (self.value >= 1 and float(self.value).is_integer()):
            raise ValueError(f"a {self.kind} budget must be a positive whole number of bytes, got {self.value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (expected one of {', '.join(DTYPES)})")
        for name, low in (("threads", 1), ("max_seq", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 4096:
            raise ValueError(f"max_batch must be an integer in [1, 4096], got {self.max_batch!r}")

    @property
    def resolved_threads(self) -> int:
        return resolve_threads(self.threads)

    def meets(self, figure: float) -> bool:
        return figure >= self.value if self.kind == "speedup" else figure <= self.value

    def show(self, figure: float) -> str:
        if self.kind == "speedup":
            return f"{figure:.3f}x"
        return f"{int(figure):,} bytes" + (f" ({figure / 2**20:.1f} MiB)" if figure >= 2**20 else "")

    @property
    def given(self) -> str:
        return f"{self.value:g}" if self.kind == "speedup" else self.show(self.value)

    def conditions(self) -> str:
        """What the figure is measured at."""
        if self.kind == "speedup":
            threads = f"{self.resolved_threads} thread" + ("s" if self.resolved_threads > 1 else "")
            return f"{self.dtype}, {threads}, batch 1, {NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt"
        if self.kind == "weight_bytes":
            return self.dtype
        seq = "the engine's default context" if self.max_seq is None else f"max_seq {self.max_seq}"
        return f"{seq} x max_batch {self.max_batch}"

    def describe(self) -> str:
        what = {"speedup": "decode speedup >=", "weight_bytes": "weights <=", "kv_bytes": "KV cache <="}[self.kind]
        return f"{what} {self.given} ({self.conditions()})"


# ============================================================================ the pure part

def count_for_budget(budget: Budget, table: Linear, layers, *, attention: bool = False,
                     removed_for: Callable[[int], list[int]] | None = None) -> tuple[int, float]:
    """The fewest removals that meet `budget`, and the figure they give: (count, figure).

    table: the figure of a plan (seconds per decode step for a speedup, bytes otherwise).
    layers: (has attention, has MLP) of each layer the model runs now. attention: remove
    attention sublayers instead of whole layers. removed_for(k): which k layers (attentions)
    the method removes; needed only when the layers differ (by default the first k: any k give
    the same figure then). At least one layer stays, as in shortrt.select. Raises BudgetError
    when even L - 1 removals miss the budget, naming the best figure reachable.
    """
    layers = [(bool(a), bool(m)) for a, m in layers]
    if not layers:
        raise ValueError("the model runs no layer")
    if removed_for is None:
        if len(set(layers)) > 1:
            raise ValueError("the layers differ (some lack attention or MLP): give removed_for(k)")
        removed_for = lambda k: list(range(k))  # noqa: E731
    dense = table.at(*_counts(layers, [], attention))
    figures = []
    for k in range(len(layers)):
        figure = _figure(budget, table, dense, _counts(layers, removed_for(k), attention))
        if budget.meets(figure):
            return k, figure
        figures.append(figure)
    best = (max if budget.kind == "speedup" else min)(range(len(figures)), key=figures.__getitem__)
    what = "attention sublayers" if attention else "layers"
    raise BudgetError(f"{OPTIONS[budget.kind]} {budget.given} cannot be met ({budget.conditions()}): the best "
                      f"reachable is {budget.show(figures[best])}, with {best} of {len(layers)} {what} removed")


def _counts(layers, removed, attention: bool) -> tuple[int, int]:
    gone = set(removed)
    if attention:
        return (sum(1 for i, (a, _) in enumerate(layers) if a and i not in gone), sum(1 for _, m in layers if m))
    kept = [f for i, f in enumerate(layers) if i not in gone]
    return sum(1 for a, _ in kept if a), sum(1 for _, m in kept if m)


def _figure(budget: Budget, table: Linear, dense: float, counts) -> float:
    value = table.at(*counts)
    return dense / value if budget.kind == "speedup" else value


# ============================================================================ choosing and checking

@dataclass
class Prediction:
    """What a budget chose: the layer map (its `budget` record holds the prediction), how many
    layers or attentions it removes, the predicted figure, and the tables it came from."""
    budget: Budget
    layer_map: LayerMap
    count: int
    predicted: float
    attention: bool
    source: Model
    table: Linear
    costs: Costs | None = None

    @property
    def unit(self) -> str:
        return "attention sublayers" if self.attention else "layers"


def layers_for_budget(model, budget: Budget, *, method: str = "shortgpt", scores=None, seed: int = 0,
                      choose: Callable[[int], LayerMap] | None = None, costs: Costs | None = None,
                      progress: bool = False) -> Prediction:
    """The layer map removing the fewest layers (attention sublayers with method="attention")
    that meets `budget`, chosen by `method` from `scores` (see shortrt.select), with its
    predicted figure. choose(k) -> LayerMap replaces the selection (the command line passes its
    own). A speedup budget measures (or reads from the cache) the model's costs unless given.
    Raises BudgetError when the budget is out of reach."""
    from .selection import select

    m = load(model)
    n = m.model_config.n_layers
    if budget.kind == "kv_bytes" and budget.max_seq is None:
        budget = dataclasses.replace(budget, max_seq=default_max_seq(m))
    if choose is None:
        sc = scores if scores is not None else {"num_layers": n}
        choose = lambda k: select(sc, remove=k, method=method, seed=seed)  # noqa: E731
    first = choose(0)  # checks the method and its scores before anything is measured
    attention = method == "attention"
    if budget.kind == "speedup":
        if costs is None:
            costs = measure_costs(m, budget.dtype, budget.threads, progress=progress)
        table = costs.table
    elif budget.kind == "weight_bytes":
        table = weight_table(m, budget.dtype)
    else:
        table = kv_table(m, budget.max_seq, budget.max_batch)
    layers = [(s.attention, s.mlp) for s in m.plan()]
    maps = {0: first}

    def chosen(k: int) -> LayerMap:
        if k not in maps:
            maps[k] = choose(k)
        return maps[k]

    removed_for = None
    if len(set(layers)) > 1:  # which layers go changes the figure: ask the method for each count
        removed_for = lambda k: chosen(k).removed_attention if attention else chosen(k).removed  # noqa: E731
    count, figure = count_for_budget(budget, table, layers, attention=attention, removed_for=removed_for)
    lmap = chosen(count)
    pred = Prediction(budget, lmap, count, figure, attention, m, table, costs)
    pred.layer_map = dataclasses.replace(lmap, budget=budget_record(pred))
    return pred


def budget_record(pred: Prediction, measured: float | None = None) -> dict:
    """The `budget` object of shortrt.json (docs/internals.md)."""
    b = pred.budget
    rec: dict = {"kind": b.kind, "target" if b.kind == "speedup" else "limit": b.value, "removes": pred.unit,
                 "removed": pred.count, "predicted": pred.predicted}
    if b.kind in ("speedup", "weight_bytes"):
        rec["dtype"] = b.dtype
    if b.kind == "speedup":
        key = pred.costs.key
        rec.update(threads=key["threads"], cpu=key["cpu"], context=key["protocol"],
                   costs={"fixed_s": pred.costs.fixed_s, "attention_s": pred.costs.attention_s,
                          "mlp_s": pred.costs.mlp_s})
    if b.kind == "kv_bytes":
        rec.update(max_seq=b.max_seq, max_batch=b.max_batch)
    if measured is not None:
        rec.update(measured=measured, measured_over_predicted=measured / pred.predicted)
    return rec


def measure_figure(pruned, source, budget: Budget, *, progress: bool = False) -> float:
    """The budget's figure measured on a written checkpoint: its decode speedup over `source`
    (shortrt.costs.speedup: the cost tables' protocol), or the bytes its Engine holds."""
    from .costs import speedup
    from .engine import Engine

    if budget.kind == "weight_bytes":
        return float(Engine(pruned, dtype=budget.dtype, threads=1, max_seq=1).weight_bytes)
    if budget.kind == "kv_bytes":
        return float(Engine(pruned, dtype=budget.dtype, threads=1, max_seq=budget.max_seq,
                            max_batch=budget.max_batch).kv_cache_bytes)
    return speedup(pruned, source, budget.dtype, budget.threads, progress=progress)


def verify(pred: Prediction, pruned, *, progress: bool = False) -> float:
    """Measure the real figure of the written checkpoint and record it beside the prediction in
    its shortrt.json (`budget.measured`). Returns it."""
    measured = measure_figure(pruned, pred.source, pred.budget, progress=progress)
    m = load(pruned)
    rewrite_layer_map(m, dataclasses.replace(m.layer_map, budget=budget_record(pred, measured)))
    return measured


# ============================================================================ what the command prints

def format_prediction(pred: Prediction) -> str:
    b = pred.budget
    lines = [f"budget      {b.describe()}"]
    if pred.costs is not None:
        c = pred.costs
        where = f"cached in {c.path}" if c.cached else f"measured in {c.seconds:.0f} s, cached in {c.path}"
        lines.append(f"costs       per decode step: fixed {1e3 * c.fixed_s:.4g} ms, "
                     f"attention {1e3 * c.attention_s:.4g} ms, MLP {1e3 * c.mlp_s:.4g} ms ({where})")
    n = len(pred.source.plan())
    lines.append(f"predicted   {pred.count} of {n} {pred.unit} removed: {b.show(pred.predicted)}")
    if b.kind == "speedup":
        dense = pred.table.at(*_counts([(s.attention, s.mlp) for s in pred.source.plan()], [], pred.attention))
        lines[-1] += f" ({1 / dense:.1f} -> {pred.predicted / dense:.1f} tok/s)"
    if pred.count == 0:
        lines.append("note        the model already meets the budget: nothing removed")
    return "\n".join(lines)


def format_verification(pred: Prediction, measured: float) -> str:
    how = ("on the written checkpoint, its runs alternating with the model's" if pred.budget.kind == "speedup"
           else "the written checkpoint's Engine")
    return (f"measured    {pred.budget.show(measured)} ({how}); predicted {pred.budget.show(pred.predicted)}, "
            f"measured / predicted {measured / pred.predicted:.3f}")


def budget_from_options(*, target_speedup=None, max_weight_bytes=None, max_kv_bytes=None, dtype=None,
                        threads=None, max_seq=None, max_batch=None) -> Budget | None:
    """The Budget of the command-line options, None without one; options that do not apply to
    the budget given are an error (they would otherwise be silently ignored)."""
    given = {"speedup": target_speedup, "weight_bytes": max_weight_bytes, "kv_bytes": max_kv_bytes}
    kinds = [k for k, v in given.items() if v is not None]
    applies = {"--dtype": ("speedup", "weight_bytes"), "--threads": ("speedup",), "--max-seq": ("kv_bytes",),
               "--max-batch": ("kv_bytes",)}
    values = {"--dtype": dtype, "--threads": threads, "--max-seq": max_seq, "--max-batch": max_batch}
    for option, kinds_ok in applies.items():
        if values[option] is not None and not any(k in kinds_ok for k in kinds):
            raise ValueError(f"{option} applies to {' and '.join(OPTIONS[k] for k in kinds_ok)} only")
    if not kinds:
        return None
    if len(kinds) > 1:
        raise ValueError(f"give one budget, not {' and '.join(OPTIONS[k] for k in kinds)}")
    kind = kinds[0]
    return Budget(kind, given[kind], dtype=dtype or "int8", threads=threads, max_seq=max_seq,
                  max_batch=max_batch or 1)
