"""What a plan costs on the runtime: weight and KV bytes (exact) and decode time (measured).

    costs = measure_costs("default", dtype="int8", threads=2)   # once, then read from the cache
    costs.step_seconds(n_attention=22, n_mlp=22)                 # a decode step of 22 full layers
    weight_table("default", "int8").at(22, 22)                   # == Engine(...).weight_bytes

Every figure is linear in what runs: fixed + attention * n_attention + mlp * n_mlp (a `Linear`).
For bytes the three terms are exact, from the runtime's layout (csrc/weights.cpp, model.cpp).

For time they are fit by least squares to the decode step times of five engine configurations
of the model: as it is, every other layer skipped, three of four skipped (Engine(skip_layers=)),
and a probe checkpoint of the model without its attention, whole and with every other layer
skipped. (The engine cannot drop an attention in memory, so the probe is written to a temporary
directory: under a second on the default model. It keeps every MLP so that the attention cost
comes from the regime attention pruning runs in.) The fixed part is the embedding row, the final
norm, the LM head and sampling.

The protocol: batch 1, greedy, no stop token, NEW_TOKENS tokens after a PROMPT_TOKENS-token
prompt, so each attention reads a context of 16 to 144 positions (attention cost grows with it;
other contexts give other costs). The configurations' runs alternate for ROUNDS rounds (ROUNDS
more while the result still moves, up to MAX_ROUNDS), and the time of a configuration is its
*lower envelope*: for each decode step the fastest of the rounds, averaged over the steps. On a
shared machine, another process preempting one of the engine's threads stalls every thread at
the next barrier, the more often the longer a step is, which medians of whole runs still carry:
in one set of runs on 2 cores at load 3-4, medians of per-run step times predicted 1.30x for a
checkpoint they measured at 1.13x; the envelope of the same runs predicted 1.244x, measured 1.243x.
`speedup()` measures a pruned checkpoint the same way.

The table is measured once per (checkpoint identity, dtype, threads, CPU model) and cached as JSON
under shortrt.checkpoint.cache_dir() / "costs"; a cache file that does not parse, or that holds
another key (a changed checkpoint, SHORTRT_KERNELS, protocol), is measured again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Model, cache_dir, load
from .layermap import LayerEntry, LayerMap

PROMPT_TOKENS = 16
NEW_TOKENS = 128
ROUNDS = 7  # rounds of alternating runs, repeated while the envelope still moves by more than SETTLED
MAX_ROUNDS = 21
SETTLED = 0.005
CONFIGURATIONS = "1, 1/2, 1/4 of the layers; no attention: 1, 1/2"  # part of the cache key: change it with _configurations
FORMAT = "shortrt.costs/1"
_Q8_BLOCK, _Q8_BLOCK_BYTES = 32, 36  # BlockQ8 (csrc/kernels.h): a float scale + 32 int8
_Q4_BLOCK, _Q4_BLOCK_BYTES = 32, 20  # BlockQ4 (csrc/kernels.h): fp16 scale and minimum + 32 nibbles
_Q4_ROWS = 16  # int4 rows are held in interleaved groups of 16 (BlockQ4x16), the last padded with zero rows
_ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Linear:
    """A figure of a plan: fixed + attention * n_attention + mlp * n_mlp."""
    fixed: float
    attention: float
    mlp: float

    def at(self, n_attention: int, n_mlp: int) -> float:
        return self.fixed + self.attention * n_attention + self.mlp * n_mlp


# ============================================================================ exact bytes

def _matrix_bytes(rows: int, cols: int, dtype: str) -> int:
    if dtype == "int8":
        return rows * cols // _Q8_BLOCK * _Q8_BLOCK_BYTES
    if dtype == "int4":
        return -(-rows // _Q4_ROWS) * _Q4_ROWS * cols // _Q4_BLOCK * _Q4_BLOCK_BYTES
    return rows * cols * _ELEMENT_BYTES[dtype]


def weight_table(model, dtype: str, lm_head_dtype: str = "auto") -> Linear:
    """Weight bytes the runtime holds (Engine.weight_bytes) per plan, exactly: matrices packed in
    `dtype`, the LM head in its format (Engine's lm_head_dtype), norms and biases in fp32, a tied
    embedding once when the head's format is dtype's (csrc/weights.cpp)."""
    from .engine import resolve_lm_head_dtype

    head_dtype = resolve_lm_head_dtype(dtype, lm_head_dtype)
    c = load(model).model_config
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    qk_norms = (q_rows + kv_rows if c.qk_norm_whole else 2 * c.head_dim) if c.qk_norm else 0  # Qwen3, OLMo-2
    attention = (4 * c.hidden + _matrix_bytes(q_rows + 2 * kv_rows, c.hidden, dtype)
                 + _matrix_bytes(c.hidden, q_rows, dtype) + (4 * (q_rows + 2 * kv_rows) if c.qkv_bias else 0)
                 + 4 * qk_norms)
    mlp = (4 * c.hidden + _matrix_bytes(2 * c.intermediate, c.hidden, dtype)
           + _matrix_bytes(c.hidden, c.intermediate, dtype))
    embed, head = _matrix_bytes(c.vocab, c.hidden, dtype), _matrix_bytes(c.vocab, c.hidden, head_dtype)
    shared = c.tie_embeddings and head_dtype == dtype
    return Linear(4 * c.hidden + embed + (0 if shared else head), attention, mlp)


def default_max_seq(model) -> int:
    """The engine's context when none is given (csrc/engine.cpp): min(max_position_embeddings, 2048)."""
    return min(load(model).model_config.max_position, 2048)


def kv_table(model, max_seq: int | None = None, max_batch: int = 1) -> Linear:
    """KV-cache bytes (Engine.kv_cache_bytes) per plan: K and V in fp32 for each attention, at
    max_seq (None = the engine's default) x max_batch (csrc/model.cpp)."""
    c = load(model).model_config
    seq = max_seq if max_seq is not None else default_max_seq(model)
    return Linear(0, 2 * 4 * seq * c.n_kv_heads * c.head_dim * max_batch, 0)


# ============================================================================ measured time

@dataclass
class Costs:
    """Seconds of one batch-1 decode step: fixed + attention * n_attention + mlp * n_mlp.

    samples: the timed configurations [{"attention", "mlp", "skip", "probe", "step_s", "fit_s"}];
    key: what the table is valid for; cached: read from `path` rather than measured now.
    """
    fixed_s: float
    attention_s: float
    mlp_s: float
    key: dict
    samples: list = field(default_factory=list)
    seconds: float = 0.0
    path: Path | None = None
    cached: bool = False

    @property
    def table(self) -> Linear:
        return Linear(self.fixed_s, self.attention_s, self.mlp_s)

    def step_seconds(self, n_attention: int, n_mlp: int) -> float:
        return self.table.at(n_attention, n_mlp)

    def to_json(self) -> dict:
        return {"format": FORMAT, "key": self.key, "fixed_s": self.fixed_s, "attention_s": self.attention_s,
                "mlp_s": self.mlp_s, "samples": self.samples, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d, key: dict, path: Path | None = None) -> "Costs":
        """The table a cache file holds; ValueError unless it is a valid one for exactly `key`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a shortrt cost table")
        if d.get("key") != key:
            raise ValueError("measured for another checkpoint, dtype, threads, CPU or protocol")
        values = [d.get(k) for k in ("fixed_s", "attention_s", "mlp_s")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values) or not values[0] > 0:
            raise ValueError("its costs are not finite non-negative seconds")
        samples, seconds = d.get("samples"), d.get("seconds")
        if not isinstance(samples, list) or isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError("its 'samples' or 'seconds' are malformed")
        return cls(*map(float, values), key=key, samples=samples, seconds=float(seconds), path=path, cached=True)


def cpu_model() -> str:
    """The CPU model string (/proc/cpuinfo's "model name", as lscpu shows it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def checkpoint_identity(model) -> str:
    """A digest of what makes a checkpoint this checkpoint: its path, config.json, shortrt.json,
    and each weight file's name, size and modification time (not its bytes: hashing gigabytes
    on every prune would cost more than the timing it saves)."""
    m = load(model)
    h = hashlib.sha256(str(m.path).encode() + b"\0")
    for name in ("config.json", "shortrt.json"):
        p = m.path / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for f in m.weight_files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def protocol(model) -> tuple[int, int]:
    """(prompt tokens, new tokens) of a timed decode; shorter for a model with a shorter context."""
    context = min(PROMPT_TOKENS + NEW_TOKENS, load(model).model_config.max_position)
    prompt = min(PROMPT_TOKENS, max(1, context // 8))
    return prompt, context - prompt


def resolve_threads(threads: int | None) -> int:
    """The engine's thread count: `threads`, or all cores (what Engine(threads=None) runs)."""
    return threads or os.cpu_count() or 1


def cost_key(model, dtype: str, threads: int | None) -> dict:
    """What a cost table is valid for: the checkpoint, dtype, threads, CPU model, kernel path and protocol."""
    m = load(model)
    prompt, new = protocol(m)
    return {"checkpoint": checkpoint_identity(m), "path": str(m.path), "dtype": dtype,
            "threads": resolve_threads(threads), "cpu": cpu_model(),
            "kernels": os.environ.get("SHORTRT_KERNELS") or "auto",
            "protocol": {"prompt_tokens": prompt, "new_tokens": new, "step": "lower envelope",
                         "rounds": [ROUNDS, MAX_ROUNDS, SETTLED], "configurations": CONFIGURATIONS}}


def costs_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "costs" / f"{digest}.json"


def measure_costs(model="default", dtype: str = "int8", threads: int | None = None, *, refresh: bool = False,
                  progress: bool = False) -> Costs:
    """The decode cost table of `model` at `dtype` and `threads` (None = all cores) on this CPU:
    read from the cache, or measured (about 20 s on the default model) and cached.
    refresh=True measures again whatever the cache holds."""
    from .engine import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    m = load(model)
    key = cost_key(m, dtype, threads)
    path = costs_path(key)
    if not refresh and (path.exists() or path.is_symlink()):
        try:
            return Costs.from_json(json.loads(path.read_text()), key, path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            if progress:
                print(f"shortrt: cost cache {path} is unusable ({exc}); measuring again", file=sys.stderr)
    costs = _measure(m, key, progress)
    costs.path = path
    _write_json(path, costs.to_json())
    return costs


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _configurations(m: Model, probe: Path | None) -> list[tuple[Path, list[int], int, int]]:
    """(checkpoint, skip_layers, n_attention, n_mlp) of each timed configuration, no two alike."""
    out: list[tuple[Path, list[int], int, int]] = []

    def add(path, plan, skip):
        kept = [s for s in plan if s.index not in set(skip)]
        row = (path, sorted(skip), sum(s.attention for s in kept), sum(s.mlp for s in kept))
        if kept and row not in out:
            out.append(row)

    plan = m.plan()
    idx = [s.index for s in plan]
    for skip in ([], idx[1::2], [i for j, i in enumerate(idx) if j % 4]):
        add(m.path, plan, skip)
    if probe is not None:
        probe_plan = load(probe).plan()
        for skip in ([], [s.index for s in probe_plan][1::2]):
            add(probe, probe_plan, skip)
    return out


def _write_probe(m: Model, tmp: Path) -> Path | None:
    """A copy of the model without any attention (its MLP-less layers left out), for the MLP cost
    alone; None when the model has no attention (or no MLP) to tell apart."""
    from .pruning import prune

    plan = m.plan()
    if not any(s.attention for s in plan) or not any(s.mlp for s in plan):
        return None
    n = m.model_config.n_layers
    keep = [i for i, e in enumerate(m.layer_map.layers) if e.mlp]
    probe = LayerMap(n, [LayerEntry(i, attention=False) for i in keep], "cost-probe",
                     [i for i in range(n) if i not in keep])
    return prune(m, probe, tmp / "probe").path


def token_gaps(engine, prompt: list[int], new_tokens: int) -> list[float]:
    """Seconds between consecutive tokens of one greedy decode (batch 1, no stop token)."""
    stamps: list[float] = []
    engine.generate_ids(prompt, max_new_tokens=new_tokens, stop=[],
                        callback=lambda _seq, _tok: stamps.append(time.perf_counter()) or True)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def alternating_steps(engines: list, prompt: list[int], new_tokens: int, bar=None) -> list[float]:
    """Decode step seconds of each engine (lower envelope, see the module docstring), their runs
    alternating after one warm-up run each: ROUNDS rounds, then ROUNDS more while any engine's
    envelope still moved by more than SETTLED (it only falls), at most MAX_ROUNDS in all."""
    for eng in engines:
        eng.generate_ids(prompt, max_new_tokens=min(8, new_tokens), stop=[])
    fastest: list[list[float] | None] = [None] * len(engines)
    before: list[float] | None = None
    for done in range(1, MAX_ROUNDS + 1):
        for i, eng in enumerate(engines):
            gaps = token_gaps(eng, prompt, new_tokens)
            fastest[i] = gaps if fastest[i] is None else [min(a, b) for a, b in zip(fastest[i], gaps)]
            if bar is not None:
                bar.update(1)
        if done % ROUNDS == 0:
            now = [sum(g) / len(g) for g in fastest]
            if before is not None and all(b - a <= SETTLED * b for a, b in zip(now, before)):
                break
            before = now
    if bar is not None:
        bar.total = bar.n  # finished early: the bar is full
        bar.refresh()
    return [sum(g) / len(g) for g in fastest]


def available_memory() -> int:
    """Bytes of memory a new allocation can have (MemAvailable), or a large number when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**62


def prompt_ids(model, n: int) -> list[int]:
    vocab = load(model).model_config.vocab
    return [(17 + 7919 * i) % vocab for i in range(n)]  # which ids does not change the time of a step


def progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not progress, file=sys.stderr)


def _measure(m: Model, key: dict, progress: bool) -> Costs:
    import numpy as np

    from .engine import Engine

    t0 = time.perf_counter()
    prompt_n, new = key["protocol"]["prompt_tokens"], key["protocol"]["new_tokens"]
    if progress:
        print(f"shortrt: measuring decode costs of {m} ({key['dtype']}, threads {key['threads']}, {key['cpu']}; "
              "once, then cached)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="shortrt-costs-") as tmp:
        probe = _write_probe(m, Path(tmp))
        configs = _configurations(m, probe)

        def engine(path, skip):
            return Engine(path, dtype=key["dtype"], threads=key["threads"], max_seq=prompt_n + new,
                          skip_layers=skip or None)

        prompt = prompt_ids(m, prompt_n)
        held = sum(weight_table(m, key["dtype"]).at(a, n) for _, _, a, n in configs)
        with progress_bar(MAX_ROUNDS * len(configs), "costs", progress) as bar:
            if held <= available_memory() // 2:  # every configuration loaded, their runs alternating
                steps = alternating_steps([engine(p, s) for p, s, _, _ in configs], prompt, new, bar)
            else:  # too large to hold them all: one after another
                steps = [alternating_steps([engine(p, s)], prompt, new, bar)[0] for p, s, _, _ in configs]
    counts = np.array([[1.0, a, n] for _, _, a, n in configs])
    coef = fit(counts, np.array(steps))
    samples = [{"attention": a, "mlp": n, "skip": len(skip), "probe": path != m.path, "step_s": s,
                "fit_s": float(row @ coef)} for row, (path, skip, a, n), s in zip(counts, configs, steps)]
    return Costs(float(coef[0]), float(coef[1]), float(coef[2]), key=key, samples=samples,
                 seconds=round(time.perf_counter() - t0, 2))


def fit(counts, steps):
    """Least squares of steps ~ counts @ (fixed, attention, mlp) with non-negative sublayer costs
    (a column that never varies, or whose cost fits negative, gets 0) and a positive fixed part."""
    import numpy as np

    active = [0] + [j for j in (1, 2) if np.ptp(counts[:, j]) > 0]
    while True:
        coef = np.zeros(3)
        coef[active] = np.linalg.lstsq(counts[:, active], steps, rcond=None)[0]
        negative = [j for j in active[1:] if coef[j] < 0]
        if not negative:
            break
        active.remove(negative[0])
    coef[0] = max(coef[0], 1e-9)
    return coef


def speedup(pruned, source, dtype: str = "int8", threads: int | None = None, *, progress: bool = False) -> float:
    """Measured decode speedup of `pruned` over `source` with the protocol of the cost tables
    (their engines alternating): source step time / pruned step time."""
    from .engine import Engine

    s = load(source)
    prompt_n, new = protocol(s)
    engines = [Engine(x, dtype=dtype, threads=resolve_threads(threads), max_seq=prompt_n + new)
               for x in (s, load(pruned))]
    with progress_bar(MAX_ROUNDS * 2, "measure", progress) as bar:
        dense, pruned_s = alternating_steps(engines, prompt_ids(s, prompt_n), new, bar)
    return dense / pruned_s
