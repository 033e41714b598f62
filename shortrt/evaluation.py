"""Quality of a (pruned) model: perplexity on held-out prose and multiple-choice accuracy.

- ``ppl``: held-out prose (shortrt.data.heldout_texts(): Persuasion, never calibrated or trained
  on), or the caller's own text (`ppl_data=`: what shortrt.data.calibration_texts takes), the
  first `n_tokens` tokens, scored in windows of `seq_len` tokens that advance by `stride`, so
  every token after a document's first `seq_len` sees at least `seq_len - stride` tokens of context.
- ``ppl_sciq``: the same on SciQ's science support texts, a domain outside the default mix.
- ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``, ``mmlu``: `n_samples` questions per
  task drawn with a fixed seed; each choice is scored by the log-likelihood of its text after
  the context. ``acc`` takes the highest sum; ``acc_norm`` the highest sum per UTF-8 byte of the
  choice (as lm-evaluation-harness does), which removes the bias toward short answers. Each
  accuracy comes with its standard error sqrt(p(1-p)/n).

The model runs through shortrt.layer_plan on transformers modules: a checkpoint with
attention-less layers works too, and `evaluate_layer_maps` scores many layer maps of one dense
model in one pass over the data, sharing the layers they have in common. A Mamba checkpoint
(shortrt.mamba) runs its blocks in transformers too, each window or choice as a sequence of its
own (a recurrent model cannot share a packed row), so its scores are those of plain transformers.
"""
from __future__ import annotations

import math
import time

import torch

from .eval_packing import Segment, pack
from .eval_tasks import TASKS, sample_task
from .checkpoint import Step, load
from .layer_plan import forward_plans, load_for_plan
from .layermap import LayerMap

PPL_TASKS = {"ppl": "persuasion", "ppl_sciq": "sciq"}  # task -> shortrt.data held-out set
ALL_TASKS = tuple(PPL_TASKS) + TASKS
ENGINES = ("hf",)
_LOGIT_CHUNK = 1024  # scored positions per lm_head call: bounds the [n, vocab] logits in memory


def parse_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if tasks == ["all"]:
        return list(ALL_TASKS)
    if not tasks:
        raise ValueError(f"no tasks given; choose from {', '.join(ALL_TASKS)} (or 'all')")
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)} (or 'all')")
    return list(dict.fromkeys(tasks))


def evaluate(model, tasks=("ppl",), *, n_samples: int = 200, n_tokens: int = 16384, seq_len: int = 512,
             stride: int = 256, seed: int = 0, engine: str = "hf", batch_tokens: int = 2048,
             progress: bool = True, layer_map: LayerMap | None = None, tokenizer=None, ppl_data=None) -> dict:
    """Scores of `model` on `tasks` (a list or "ppl,arc_easy,..."); see the module docstring.

    layer_map: run only these layers of `model` (in memory; indices are the model's layers).
    ppl_data: score "ppl" on this text instead of Persuasion (a path, a list of paths or of strings).
    Returns {"model", "layers", "attention_layers", "tasks": {task: metrics}, "seconds", "settings"}.
    """
    results = evaluate_layer_maps(model, {"model": layer_map}, tasks, n_samples=n_samples, n_tokens=n_tokens,
                                  seq_len=seq_len, stride=stride, seed=seed, engine=engine,
                                  batch_tokens=batch_tokens, progress=progress, tokenizer=tokenizer,
                                  ppl_data=ppl_data)
    return results["model"]


def evaluate_layer_maps(model, layer_maps: dict, tasks=("ppl",), *, n_samples: int = 200,
                        n_tokens: int = 16384, seq_len: int = 512, stride: int = 256, seed: int = 0,
                        engine: str = "hf", batch_tokens: int = 2048, progress: bool = True,
                        tokenizer=None, hf=None, per_item: bool = False, ppl_data=None) -> dict:
    """{name: evaluate-style result} for each layer map (None = the model as it is), in one pass.

    Every map sees the same questions and windows, so their differences are paired.
    hf: an already loaded transformers model of `model` (saves reloading it).
    per_item: also return each question's correctness (and each ppl window's NLL and token
    count) under "items", for paired comparisons between maps.
    ppl_data: the text "ppl" scores instead of Persuasion (see evaluate).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown evaluation engine {engine!r}; choose from {', '.join(ENGINES)}")
    tasks = parse_tasks(tasks)
    _check_sizes(n_samples, n_tokens, seq_len, stride, batch_tokens)
    m = load(model, runtime=False)  # Mamba (calibrate/prune-only) runs here too, through transformers
    if hf is None:
        hf, base = load_for_plan(m) if m.runtime_supported else (m.load_hf(), m.plan())
    else:
        base = m.plan()
    tokenizer = tokenizer if tokenizer is not None else m.tokenizer()
    names = list(layer_maps)
    plans = [base if layer_maps[n] is None else apply_layer_map(base, layer_maps[n]) for n in names]

    t0 = time.perf_counter()
    segments, owners = [], []  # owners[i] = (task, question or None)
    ppl_sources = {}
    for task in (t for t in tasks if t in PPL_TASKS):
        texts, ppl_sources[task] = _ppl_texts(task, ppl_data)
        for s in ppl_segments(tokenizer, n_tokens, seq_len, stride, texts):
            segments.append(s)
            owners.append((task, None))
    questions = {}
    for task in (t for t in tasks if t not in PPL_TASKS):
        questions[task] = sample_task(task, n_samples, seed)
        for q, s in zip(questions[task], mc_segments(tokenizer, questions[task])):
            segments.append(s)
            owners.append((task, q))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A recurrent (Mamba) model cannot share a row between segments: each runs alone, unpacked.
    batches = pack(segments, row_tokens=seq_len, batch_tokens=batch_tokens, pad_id=pad_id) \
        if m.runtime_supported else []
    width = 1 + max([len(s.branches) for s in segments] + [0])
    sums = [torch.zeros(len(segments), width, dtype=torch.float64) for _ in plans]
    counts = torch.zeros(len(segments), width, dtype=torch.long)
    total_tokens = sum(b.num_tokens for b in batches) if batches else sum(map(len, segments))
    bar = _progress(progress, total_tokens, f"eval {','.join(tasks)}")
    with torch.inference_mode():
        if not m.runtime_supported:
            _score_unpacked(hf, segments, plans, sums, counts, bar)
        for batch in batches:
            hidden = forward_plans(hf, batch.input_ids, batch.position_ids, batch.mask, plans)
            slot = batch.branch + 1
            counts.index_put_((batch.segment, slot), torch.ones_like(slot), accumulate=True)
            for p, h in enumerate(hidden):
                logp = _token_logprobs(hf, h[batch.rows, batch.cols], batch.targets)
                sums[p].index_put_((batch.segment, slot), logp.double(), accumulate=True)
            if bar is not None:
                bar.update(batch.num_tokens)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    settings = {"n_samples": n_samples, "n_tokens": n_tokens, "seq_len": seq_len, "stride": stride,
                "seed": seed, "engine": engine, "tokens_run": total_tokens}
    out = {}
    for name, plan, total in zip(names, plans, sums):
        metrics = {}
        for task in tasks:
            idx = [i for i, (t, _) in enumerate(owners) if t == task]
            if task in PPL_TASKS:
                metrics[task] = {**_ppl_metrics(total, counts, idx, per_item), "data": ppl_sources[task]}
            else:
                metrics[task] = _mc_metrics(total, [owners[i][1] for i in idx], idx, per_item)
        out[name] = {"model": m.name, "layers": len(plan),
                     "attention_layers": sum(1 for s in plan if s.attention) if m.runtime_supported else 0,
                     "architecture": m.model_config.architecture,
                     "tasks": metrics, "seconds": seconds, "settings": settings}
    return out


def _score_unpacked(hf, segments: list[Segment], plans, sums, counts, bar) -> None:
    """The sums and counts the packed loop gathers, for a Mamba model (shortrt.mamba.forward_blocks):
    each perplexity window, and each choice after its context, run as a sequence of its own."""
    from .mamba import forward_blocks

    for i, seg in enumerate(segments):
        runs = [(seg.context, 0, len(seg.context))] if seg.score_context_from is not None else []
        runs += [(seg.context + b, k + 1, len(b)) for k, b in enumerate(seg.branches)]
        for ids, slot, n_scored in runs:
            first = max(1, seg.score_context_from) if slot == 0 else len(ids) - n_scored
            targets = torch.tensor(ids[first:])
            counts[i, slot] += targets.numel()
            for p, plan in enumerate(plans):
                hidden = forward_blocks(hf, torch.tensor([ids]), plan)[0]
                sums[p][i, slot] += _token_logprobs(hf, hidden[first - 1:-1], targets).double().sum()
        if bar is not None:
            bar.update(len(seg))


def apply_layer_map(base: tuple[Step, ...], layer_map: LayerMap) -> tuple[Step, ...]:
    """The plan of running `layer_map` on a model whose own plan is `base` (its layers in order)."""
    if layer_map.source_num_layers != len(base):
        raise ValueError(f"the layer map is for {layer_map.source_num_layers} layers but the model has {len(base)}")
    steps = []
    for e in layer_map.layers:
        if e.kind != "layer":
            raise ValueError("replacement entries have no weights in this model; evaluate their checkpoint")
        b = base[e.source]
        steps.append(Step(b.index, b.attention and e.attention, b.mlp and e.mlp))
    return tuple(steps)


def _ppl_texts(task: str, ppl_data) -> tuple[list[str], str]:
    """(texts, description) a perplexity task scores."""
    from . import data

    if task == "ppl" and ppl_data is not None:
        return data.calibration_texts(ppl_data)
    name = PPL_TASKS[task]
    return data.heldout_texts(name), data.HELDOUT_SETS[name]


def ppl_segments(tokenizer, n_tokens: int, seq_len: int, stride: int, texts=None) -> list[Segment]:
    """Strided windows over the first `n_tokens` scored tokens of `texts` (default: Persuasion)."""
    from .data import heldout_texts

    segments, budget = [], n_tokens
    for text in heldout_texts() if texts is None else texts:
        if budget <= 0:
            break
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: budget + 1]
        if len(ids) < 2:
            continue
        budget -= len(ids) - 1  # a document's first token has nothing to be predicted from
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len, len(ids))
            segments.append(Segment(ids[begin:end], score_context_from=max(1, prev_end - begin)))
            prev_end = end
            if end == len(ids):
                break
    if not segments:
        raise ValueError("the perplexity text produced no tokens to score (each document needs 2 tokens or more)")
    return segments


def runtime_perplexity(engine, *, n_tokens: int = 16384, seq_len: int = 512, stride: int = 256, texts=None,
                       progress: bool = False) -> dict:
    """Perplexity of a shortrt.Engine (the C++ runtime, in its dtype and LM-head format) on the same
    strided windows `evaluate` scores ("ppl": Persuasion unless `texts` is given): {"ppl", "nll", "tokens"}.
    Each window runs through Engine.logits alone, from position 0."""
    _check_sizes(1, n_tokens, seq_len, stride, seq_len)
    segments = ppl_segments(load(engine.checkpoint_dir).tokenizer(), n_tokens, seq_len, stride, texts)
    total = torch.zeros(len(segments), 1, dtype=torch.float64)
    counts = torch.zeros(len(segments), 1, dtype=torch.long)
    bar = _progress(progress, sum(len(s.context) for s in segments), "perplexity")
    for i, seg in enumerate(segments):
        logp = torch.log_softmax(torch.from_numpy(engine.logits(seg.context)[:-1]).double(), dim=-1)
        targets = torch.tensor(seg.context[1:])
        picked = logp.gather(1, targets[:, None])[:, 0][seg.score_context_from - 1:]
        total[i, 0], counts[i, 0] = picked.sum(), picked.numel()
        if bar is not None:
            bar.update(len(seg.context))
    if bar is not None:
        bar.close()
    return _ppl_metrics(total, counts, range(len(segments)))


def mc_segments(tokenizer, questions) -> list[Segment]:
    contexts = tokenizer([q.context for q in questions], add_special_tokens=False)["input_ids"]
    flat = [c for q in questions for c in q.choices]
    choice_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    segments, k = [], 0
    for q, ctx in zip(questions, contexts):
        n = len(q.choices)
        segments.append(Segment(list(ctx), [list(c) for c in choice_ids[k:k + n]]))
        k += n
    return segments


def _token_logprobs(hf, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, hidden.shape[0], _LOGIT_CHUNK):
        logits = hf.lm_head(hidden[i:i + _LOGIT_CHUNK]).float()
        logp = torch.log_softmax(logits, dim=-1)
        out.append(logp.gather(1, targets[i:i + _LOGIT_CHUNK, None])[:, 0])
    return torch.cat(out) if out else hidden.new_zeros(0)


def _ppl_metrics(total, counts, idx, per_item: bool = False) -> dict:
    logp = float(total[idx, 0].sum())
    n = int(counts[idx, 0].sum())
    nll = -logp / n
    out = {"ppl": math.exp(nll), "nll": nll, "tokens": n}
    if per_item:
        out["items"] = {"window_nll": [-float(total[i, 0]) for i in idx],
                        "window_tokens": [int(counts[i, 0]) for i in idx]}
    return out


def _mc_metrics(total, questions, idx, per_item: bool = False) -> dict:
    correct, correct_norm = [], []
    for q, i in zip(questions, idx):
        ll = total[i, 1:1 + len(q.choices)]
        per_byte = ll / torch.tensor([len(c.encode("utf-8")) for c in q.choices], dtype=ll.dtype)
        correct.append(int(int(ll.argmax()) == q.gold))
        correct_norm.append(int(int(per_byte.argmax()) == q.gold))
    n = len(questions)
    acc, acc_norm = sum(correct) / n, sum(correct_norm) / n
    out = {"acc": acc, "acc_se": _se(acc, n), "acc_norm": acc_norm, "acc_norm_se": _se(acc_norm, n), "n": n}
    if per_item:
        out["items"] = {"correct": correct, "correct_norm": correct_norm}
    return out


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def _check_sizes(n_samples, n_tokens, seq_len, stride, batch_tokens) -> None:
    for name, value in (("n_samples", n_samples), ("n_tokens", n_tokens), ("seq_len", seq_len),
                        ("stride", stride), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if stride > seq_len:
        raise ValueError(f"stride ({stride}) cannot exceed seq_len ({seq_len}): tokens would go unscored")


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc)


def format_table(result: dict) -> str:
    """A readable table of one evaluate() result."""
    blocks = "Mamba blocks" if result.get("architecture") == "MambaForCausalLM" else \
        f"layers ({result['attention_layers']} with attention)"
    lines = [f"model {result['model']}: {result['layers']} {blocks}, {result['seconds']:.0f} s", "",
             f"{'task':<14} {'metric':<28} {'n':>6}"]
    for task, m in result["tasks"].items():
        if task in PPL_TASKS:
            lines.append(f"{task:<14} {'ppl ' + format(m['ppl'], '.3f'):<28} {m['tokens']:>6}")
        else:
            acc = f"acc {100 * m['acc']:.1f} ± {100 * m['acc_se']:.1f}"
            norm = f"acc_norm {100 * m['acc_norm']:.1f} ± {100 * m['acc_norm_se']:.1f}"
            lines.append(f"{task:<14} {acc:<28} {m['n']:>6}")
            lines.append(f"{'':<14} {norm:<28}")
    return "\n".join(lines)
