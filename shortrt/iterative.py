"""Iterative layer removal: remove the least influential layer, recalibrate the pruned model, repeat.

ShortGPT (`select(..., method="shortgpt")`) ranks the layers once, on the dense model. Here each
round measures every remaining layer on the model *with the layers removed so far absent* and
removes the one that changes the hidden state least; Minitron (Muralidharan et al. 2024)
recommends this beyond about a third of the layers, and Gromov et al. / ShortGPT discuss it.
Removing a layer changes what every later layer sees, so one-shot scores go stale as N grows.

A layer's score is shortrt.calibration's: BI = 1 - mean_t cos(h_in, h_out) or the angular
distance mean_t arccos(cos)/pi, over the same calibration tokens in every round, with the same
accumulator and cosine kernel as `shortrt.calibrate`. The model is loaded once and run following
a plan (shortrt.layer_plan): removed layers are simply not in the plan, so nothing is written
between rounds.

Prefix reuse: the layers before the first removed one see the same inputs in every round, so
their scores cannot change. The state entering the first removed position is kept per batch
(all calibration tokens x hidden, fp32: 19 MB for 8,192 tokens of the default model) and later
rounds start from it, until a layer in front of it is removed.
"""
from __future__ import annotations

import math
import time

from .errors import ShortrtError
from .layermap import LayerMap

METRICS = ("bi", "angular")
DEFAULT_TOKENS = 8192  # per round: 8 rounds on the default model take a few minutes on 2 cores


def iterative_select(model, *, remove=None, ratio=None, texts=None, n_tokens: int = DEFAULT_TOKENS,
                     seq_len: int | None = None, batch_size: int = 4, metric: str = "bi", backend: str = "auto",
                     reuse_prefix: bool = True, progress: bool = True) -> LayerMap:
    """A LayerMap removing `remove` layers (or round(ratio * L)), one per round, each the lowest-`metric`
    layer of the model with the earlier rounds' layers removed.

    model: "default", a checkpoint directory, a .gguf file or a shortrt Model (indices are its layers).
    texts, n_tokens, seq_len, batch_size, backend: as shortrt.calibrate's, n_tokens per round;
    seq_len defaults to 512 or the model's context if shorter.
    metric: "bi" (Block Influence) or "angular" (angular distance).
    reuse_prefix: start each round from the kept state before the first removed layer (see the
    module docstring); False recomputes it, for comparison.
    The map's `scores` hold the dense model's per-layer scores (round 1, what shortgpt ranks by),
    `order` (the layers in the order removed), `order_scores` (each one's score in its round) and
    `rounds` (every layer's score in each round, null once removed); `calibration` the data and seconds.
    """
    import torch
    from tqdm.auto import tqdm

    from . import data
    from .calibration import (SimilarityAccumulator, calibration_sequences, check_options, check_seq_len,
                              sequence_batches)
    from .checkpoint import load
    from .layer_plan import load_for_plan
    from .selection import count_to_remove

    check_options(n_tokens=n_tokens, seq_len=512 if seq_len is None else seq_len, batch_size=batch_size,
                  backend=backend)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    ckpt = load(model)
    num_layers = ckpt.model_config.n_layers
    n = count_to_remove(num_layers, remove, ratio)
    if seq_len is None:
        seq_len = min(512, ckpt.model_config.max_position)
    check_seq_len(ckpt.config(), seq_len)
    texts, description = data.calibration_texts("default" if texts is None else texts)
    record = {"metric": metric, "order": [], "order_scores": [], "rounds": []}
    if n == 0:
        return LayerMap.from_removed(num_layers, [], method="iterative", scores=record, source=ckpt.name)

    sequences = calibration_sequences(ckpt.tokenizer(), texts, n_tokens, seq_len)
    batches = list(sequence_batches(sequences, batch_size))
    used_tokens = sum(seq.shape[0] for seq in sequences)
    hf, _ = load_for_plan(ckpt)

    # Per layer, the (mean cos, mean angular) of the latest round that ran it.
    stats = [(math.nan, math.nan)] * num_layers
    prefix, prefix_states = (), []  # plan steps already run, and per batch the state leaving them
    removed: list[int] = []
    round_seconds, round_layers = [], []
    started = time.perf_counter()
    for r in range(n):
        t0 = time.perf_counter()
        plan = ckpt.plan(sorted(removed))
        skip = len(prefix) if prefix and plan[:len(prefix)] == prefix else 0
        # Later rounds only remove more, so the steps before the first removed layer stay their prefix.
        shared = sum(1 for s in plan if s.index < min(removed)) if removed else 0
        save = reuse_prefix and r < n - 1 and shared > skip
        acc = SimilarityAccumulator(num_layers, 1, backend)
        with torch.inference_mode(), tqdm(total=used_tokens, unit="tok", desc=f"round {r + 1}/{n}",
                                          disable=not progress) as bar:
            saved = _run_round(hf, batches, plan, skip, prefix_states, shared if save else None, acc, bar)
            means = acc.means()[0][acc.BLOCK]
            for step in plan[skip:]:
                stats[step.index] = (float(means[step.index, 0]), float(means[step.index, 1]))
            scores = {s.index: _score(stats[s.index], metric) for s in plan}
            bad = [i for i, v in scores.items() if not math.isfinite(v)]
            if bad:
                raise ShortrtError(f"round {r + 1}: the {metric} scores are not finite at layers {bad}")
            chosen = min(scores, key=lambda i: (scores[i], i))  # ties go to the lower index, as in select
            bar.set_postfix_str(f"removed layer {chosen}, {metric} {scores[chosen]:.4f}")
        if save:
            prefix, prefix_states = plan[:shared], saved
        if r == 0:
            record["bi"] = [1.0 - cos for cos, _ in stats]
            record["angular"] = [angular for _, angular in stats]
        record["rounds"].append([scores.get(i) for i in range(num_layers)])
        record["order"].append(chosen)
        record["order_scores"].append(scores[chosen])
        removed.append(chosen)
        round_seconds.append(round(time.perf_counter() - t0, 2))
        round_layers.append(len(plan) - skip)

    calibration = {"source": description, "n_tokens": used_tokens, "seq_len": seq_len,
                   "n_sequences": len(sequences), "backend": backend, "rounds": n,
                   "seconds": round(time.perf_counter() - started, 2), "round_seconds": round_seconds,
                   "round_layers_run": round_layers, "reuse_prefix": reuse_prefix}
    return LayerMap.from_removed(num_layers, removed, method="iterative", scores=record,
                                 calibration=calibration, source=ckpt.name)


def _run_round(hf, batches, plan, skip: int, prefix_states, save_at: int | None, acc, bar) -> list:
    """Every batch through plan[skip:] (from its kept prefix state when skip > 0), each step's input
    and output added to `acc`; returns per batch the state leaving the first `save_at` steps (if given)."""
    from .layer_plan import plan_steps

    saved = []
    for b, batch in enumerate(batches):
        start = prefix_states[b] if skip else None
        for p, h_in, h_out in plan_steps(hf, batch, plan[skip:], start=start):
            acc.add_layer(acc.BLOCK, plan[skip + p].index, _flat(h_in), _flat(h_out))
            if skip + p + 1 == save_at:
                saved.append(h_out)
        bar.update(batch.numel())
    return saved


def _flat(h):
    return h.reshape(-1, h.shape[-1])


def _score(stat: tuple[float, float], metric: str) -> float:
    cos, angular = stat
    return 1.0 - cos if metric == "bi" else angular
