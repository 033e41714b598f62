"""Heal a pruned checkpoint by knowledge distillation from its source model: `heal(ckpt, out_dir)`.

The student is the pruned checkpoint, whatever made it (layers removed, attention-only pruning, a
`replace` checkpoint with a trained layer or an attention-less MLP); it runs through
shortrt.layer_plan, so attention-less layers train like any other. The teacher is the model its
shortrt.json names as the source (or `teacher=`). Loss: KL(teacher || student) between the
next-token distributions at temperature T, scaled by T^2, optionally plus `hidden_weight` times
the MSE between the student's layer outputs and the teacher's at the same depth (each student
layer is paired with the teacher's output of the last original layer it stands for, the MSE
divided by the teacher state's mean square so the weight does not depend on the model's scale).

Teacher targets are computed once, before training: the teacher's top-k tokens at each position
with their log-probabilities at temperature T, plus the log of the mass left over (TOP_K = 128:
about 25 MB per 16k tokens, where the full distribution of SmolLM2 is 196 KB per token). The KL is
then exact on k + 1 bins (the top-k tokens and "the rest"), a lower bound of the full KL that
the rest bin keeps tight. That is faster here than running the teacher beside every step: each
training token costs the teacher one forward pass either way, but the held-out slice is scored
every `eval_every` steps and the training sequences are seen for several epochs, and neither
runs the teacher again. (With hidden_weight > 0 the teacher's states are too big to keep, so it
runs beside each step for them.)

Trainable parameters: LoRA adapters (shortrt.lora) on q/k/v/o and gate/up/down of every layer
the student runs, merged into the weights at the end; or with full=True every weight of those
layers (norms included). Embeddings, lm_head and the final norm stay frozen. The output has the
student's layout, config and layer map, and shortrt.json gains a "healing" record
(docs/internals.md). Fixed seed; the best step on the held-out slice (by KL) is kept, so healing
never makes the held-out KL worse.

Defaults: 65,536 tokens of the default text mix in sequences of 512 (1/8 held out, at most 8
sequences), Adam steps of 4 sequences for 600 s of training (the cosine schedule is fitted to
the time from the measured pace; at most 1000 steps), LoRA rank 8, alpha 16, peak learning
rate 3e-3 (1e-4 with full=True), bf16 where the CPU has bf16 instructions. On the default
model that is the teacher pass (about 1.5-3 min) plus 10 min: within 15 min on 2 cores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
from torch import nn

from . import lora as _lora
from .checkpoint import Model, check_out_dir, load, sublayer_prefixes, write_checkpoint
from .devices import is_cuda, resolve_device
from .errors import ShortrtError

DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 512
DEFAULT_STEPS = 1000     # a cap: the time limit ends the default run
DEFAULT_BATCH = 4
DEFAULT_RANK = 8
DEFAULT_LR = 3e-3       # LoRA: 40 steps at 3e-3 beat 1e-3 (held-out ppl 55.3 vs 60.3, shortgpt-8)
DEFAULT_FULL_LR = 1e-4  # full=True: every weight moves, so a smaller step
TOP_K = 128
DEFAULT_TIME_LIMIT = 600.0  # seconds of training: with the teacher pass, healing stays within 15 minutes
HELDOUT_FRACTION = 0.125
MAX_HELDOUT_SEQUENCES = 8  # a check then costs a few seconds, whatever the data size
EVAL_EVERY = 20
PATIENCE = 3            # evaluations without a 0.1 % gain in held-out KL before stopping


def heal(ckpt, out_dir, *, teacher=None, texts=None, n_tokens: int = DEFAULT_TOKENS,
         seq_len: int = DEFAULT_SEQ_LEN, steps: int = DEFAULT_STEPS, lr: float | None = None,
         batch: int = DEFAULT_BATCH, rank: int = DEFAULT_RANK, alpha: float | None = None, full: bool = False,
         temperature: float = 1.0, hidden_weight: float = 0.0, seed: int = 0,
         time_limit: float | None = DEFAULT_TIME_LIMIT,
         precision: str = "auto", device: str = "cpu", overwrite: bool = False, progress: bool = True) -> Model:
    """Distill `teacher` into the pruned checkpoint `ckpt` and write the healed checkpoint to `out_dir`.

    ckpt: a pruned checkpoint directory (or Model). teacher: None (the source its shortrt.json
    names), "default", a checkpoint directory or a .gguf file. texts: training text (None = the
    default calibration text; a .txt/.jsonl path or a list of strings). n_tokens, seq_len:
    training tokens (1/8 held out) and tokens per sequence. steps, lr, batch: most Adam steps,
    peak learning rate (None: 1e-3 for LoRA, 1e-4 with full), sequences per step. rank, alpha:
    LoRA rank and scale numerator (None = 2 * rank). full: train every weight of the student's
    layers instead of adapters. temperature: of both distributions in the KL. hidden_weight:
    weight of the hidden-state MSE term. time_limit: seconds of training (steps and their held-out
    checks) after which it stops at the next step, None for no limit. precision: of the forward
    and backward passes: "fp32"; "bf16" (LoRA: the frozen weights and the teacher in bf16, the
    adapters fp32 and merged into the checkpoint's own fp32 weights; full: fp32 weights under
    torch autocast); "auto": bf16 where the CPU has bf16 dot-product instructions (AVX512-BF16,
    AMX) or on a GPU, else fp32. device: "cpu", "cuda" or "cuda:N" (checked before anything is
    loaded; both models and the training run there, the written values come back to the CPU).
    Returns the written checkpoint as a loaded Model.
    """
    from . import data
    from .layer_plan import load_for_plan

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    lr = (DEFAULT_FULL_LR if full else DEFAULT_LR) if lr is None else lr
    alpha = 2.0 * rank if alpha is None else alpha
    _check_settings(n_tokens=n_tokens, seq_len=seq_len, steps=steps, batch=batch, rank=rank, seed=seed, lr=lr,
                    alpha=alpha, temperature=temperature, hidden_weight=hidden_weight, time_limit=time_limit)
    t_start = time.perf_counter()
    student = load(ckpt)
    teacher_model = _teacher_of(student, teacher)
    boundaries = _boundaries(student, teacher_model) if hidden_weight else None
    if seq_len > student.model_config.max_position:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{student.model_config.max_position}")
    out = check_out_dir(out_dir, student.path, overwrite)  # before minutes of training, not after

    texts, description = data.calibration_texts("default" if texts is None else texts)
    batches, used_tokens = data.training_batches(student.tokenizer(), texts, n_tokens, seq_len, batch)
    ids = torch.cat(batches).to(dev)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=gen)
    n_held = min(len(ids) - 1, MAX_HELDOUT_SEQUENCES, max(1, round(len(ids) * HELDOUT_FRACTION)))
    held, train = order[:n_held], order[n_held:]

    work_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher_hf, teacher_plan = load_for_plan(teacher_model)
    teacher_hf.to(dev, work_dtype)  # frozen: its weights may be bf16 outright (no per-call casts)
    t0 = time.perf_counter()
    targets = teacher_targets(teacher_hf, teacher_plan, ids, temperature, batch, progress=progress)
    teacher_ppl = math.exp(_nll(targets.nll[held]))
    teacher_seconds = time.perf_counter() - t0
    if not hidden_weight:
        del teacher_hf  # the targets are all the training needs from it

    hf, plan = load_for_plan(student)
    hf.to(dev)
    if not full:
        hf.to(work_dtype)  # frozen base weights; the adapters stay fp32
    params, trained = make_trainable(hf, plan, rank=rank, alpha=alpha, full=full, seed=seed)
    # Full training keeps fp32 weights (Adam's updates need them) and multiplies in bf16 under autocast.
    amp = (lambda: autocast(precision, dev.type)) if full else contextlib.nullcontext
    fit = _train(hf, plan, params, ids, train, held, targets, steps=steps, lr=lr, batch=batch,
                 temperature=temperature, hidden_weight=hidden_weight, seed=seed, time_limit=time_limit,
                 teacher=(teacher_hf, teacher_plan, boundaries) if hidden_weight else None, amp=amp,
                 progress=progress)
    new = trained_values(student, hf, plan, trained, full)
    record = {
        "teacher": teacher_model.origin,
        "data": {"source": description, "n_tokens": used_tokens, "seq_len": seq_len,
                 "train_sequences": len(train), "heldout_sequences": n_held},
        "mode": "full" if full else "lora",
        **({} if full else {"rank": rank, "alpha": alpha}),
        "trainable_parameters": sum(p.numel() for p in params),
        "loss": f"kl(T={temperature:g}) * T^2" + (f" + {hidden_weight:g} * hidden mse" if hidden_weight else ""),
        "temperature": temperature, "hidden_weight": hidden_weight, "top_k": targets.top_k,
        "steps": fit["steps"], "max_steps": steps, "last_lr": fit["last_lr"], "best_step": fit["best_step"], "stopped": fit["stopped"],
        "time_limit": time_limit, "batch": batch, "lr": lr, "seed": seed, "precision": precision,
        "device": dev.type,
        "kl_before": fit["history"][0][2], "kl_after": fit["best_kl"],
        "ppl_before": fit["history"][0][3], "ppl_after": fit["best_ppl"], "teacher_ppl": teacher_ppl,
        "history": fit["history"],
        "tokens_per_second": fit["tokens_per_second"],
        # train: the optimizer steps (what tokens_per_second counts); heldout: the checks between them
        "seconds": {"teacher": round(teacher_seconds, 2), "train": round(fit["seconds"], 2),
                    "heldout": round(fit["heldout_seconds"], 2), "total": round(time.perf_counter() - t_start, 2)},
    }
    if student.layer_map.healing:
        record["previous"] = student.layer_map.healing
    return _write(student, new, record, out, overwrite)


def healed_checkpoint(student, **kw) -> Model:
    """`student` healed by heal(student, ..., **kw), made once and cached beside it (its directory
    name + "+heal"; the benchmarks use this). Remade when the cached checkpoint's layer map or
    recorded settings differ from what these arguments would give now."""
    student = load(student)
    out = student.path.parent / f"{student.path.name}+heal"
    wanted = {"n_tokens": kw.get("n_tokens", DEFAULT_TOKENS), "seq_len": kw.get("seq_len", DEFAULT_SEQ_LEN),
              "max_steps": kw.get("steps", DEFAULT_STEPS), "batch": kw.get("batch", DEFAULT_BATCH),
              "mode": "full" if kw.get("full") else "lora", "seed": kw.get("seed", 0),
              "precision": resolve_precision(kw.get("precision", "auto"), kw.get("device"))}
    if (out / "shortrt.json").is_file():
        try:
            cached = load(out)
            rec = cached.layer_map.healing or {}
            got = {**{k: rec.get(k) for k in wanted}, "n_tokens": rec.get("data", {}).get("n_tokens")}
            same_layers = cached.layer_map.to_json()["layers"] == student.layer_map.to_json()["layers"]
            if same_layers and all(got[k] == v or (k == "n_tokens" and got[k] and got[k] <= v)
                                   for k, v in wanted.items()):
                return cached
        except (ShortrtError, KeyError, TypeError):
            pass  # damaged or made by an older shortrt: heal again
    return heal(student, out, overwrite=True, **kw)


# ---------------------------------------------------------------------------- checks and setup

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device=None) -> str:
    """"fp32" or "bf16" for a `precision` argument ("auto": bf16 on a GPU and where the CPU
    multiplies bf16 natively -- there it is several times faster than fp32 -- else fp32, which
    emulated bf16 would not beat)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if is_cuda(device):
            return "bf16"
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "fp32"
    return precision


def autocast(precision: str, device_type: str = "cpu"):
    """The forward passes' context: bf16 matrix products under torch autocast, or plain fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _check_settings(*, lr, alpha, temperature, hidden_weight, time_limit, **counts) -> None:
    for name, value in counts.items():
        low = 0 if name == "seed" else 2 if name == "seq_len" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value, ok in (("lr", lr, lambda v: v > 0), ("alpha", alpha, lambda v: v > 0),
                            ("temperature", temperature, lambda v: v > 0),
                            ("hidden_weight", hidden_weight, lambda v: v >= 0),
                            *((("time_limit", time_limit, lambda v: v > 0),) if time_limit is not None else ())):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be a finite number {'>= 0' if name == 'hidden_weight' else '> 0'}, "
                             f"got {value!r}")


def _teacher_of(student: Model, teacher) -> Model:
    if teacher is None:
        if not student.is_pruned:
            raise ShortrtError(f"{student} has no shortrt.json, so it names no source model to learn from; "
                               "give the teacher (--teacher MODEL)")
        teacher = student.layer_map.source
    t = load(teacher)
    if t.path == student.path:
        raise ShortrtError(f"the teacher {t} is the checkpoint being healed; give its source model")
    if t.model_config.vocab != student.model_config.vocab:
        raise ShortrtError(f"the teacher {t} has a vocabulary of {t.model_config.vocab} tokens but {student} has "
                           f"{student.model_config.vocab}: distillation needs the same tokenizer")
    return t


def _boundaries(student: Model, teacher: Model) -> tuple[list[int], list[int]]:
    """(student plan positions, teacher plan positions) whose outputs the hidden MSE compares:
    each student layer against the teacher's output of the last original layer it stands for."""
    lmap = student.layer_map
    if not teacher.layer_map.is_dense or teacher.model_config.n_layers != lmap.source_num_layers:
        raise ShortrtError(f"hidden_weight needs the dense source model as teacher ({lmap.source_num_layers} "
                           f"layers); {teacher} has {teacher.model_config.n_layers} (method "
                           f"{teacher.layer_map.method!r})")
    pairs = [(p, max(lmap.layers[step.index].sources)) for p, step in enumerate(student.plan())]
    return [p for p, _ in pairs], [t for _, t in pairs]


def make_trainable(hf, plan, *, rank: int, alpha: float, full: bool, seed: int):
    """Freeze `hf`, then make the layers `plan` runs trainable: LoRA adapters on their projections
    (only the sublayers the plan runs), or with full=True all their sublayers' weights.
    Returns (parameters to optimize, checkpoint tensor names the training changes)."""
    from .layer_plan import is_post_norm, is_sandwich_norm

    hf.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params, trained = [], []
    for step in plan:
        layer, prefix = hf.model.layers[step.index], f"model.layers.{step.index}."
        parts = (("attention",) if step.attention else ()) + (("mlp",) if step.mlp else ())
        if full:
            owners = sublayer_prefixes(is_post_norm(layer), is_sandwich_norm(layer))  # a sublayer's norm trains with it
            for name, p in layer.named_parameters():
                if name.startswith(sum((owners[part] for part in parts), ())):
                    params.append(p.requires_grad_(True))
                    trained.append(prefix + name)
            continue
        projections = _lora.projections_of(layer, parts)
        for adapter in _lora.attach(layer, projections, rank, alpha, gen):
            params += [adapter.lora_A, adapter.lora_B]
        trained += [prefix + path + ".weight" for path in projections]
    return params, trained


# ---------------------------------------------------------------------------- teacher targets

@dataclasses.dataclass
class TeacherTargets:
    """Per sequence and position: the teacher's top-k tokens, their log-probabilities at the
    temperature, the log of the remaining mass, and the NLL of the actual next token (T = 1)."""
    index: torch.Tensor     # [n, T, k] int64
    logp: torch.Tensor      # [n, T, k] float32
    rest: torch.Tensor      # [n, T] float32
    nll: torch.Tensor       # [n, T - 1] float32

    @property
    def top_k(self) -> int:
        return self.index.shape[-1]


@torch.inference_mode()
def teacher_targets(hf, plan, ids: torch.Tensor, temperature: float, batch: int, *, top_k: int = TOP_K,
                    progress: bool = True) -> TeacherTargets:
    from tqdm.auto import tqdm

    from .layer_plan import plan_states

    parts = []
    bar = tqdm(total=ids.numel(), desc="teacher top-k", unit="tok", unit_scale=True, disable=not progress)
    for i in range(0, len(ids), batch):
        rows = ids[i:i + batch]
        logits = hf.lm_head(plan_states(hf, rows, plan)[0]).float()
        logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
        index = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
        top = logp.gather(-1, index)
        # The rest bin from the top-k mass (one pass fewer over the vocabulary than a masked
        # logsumexp); clamped like the student's, so a near-certain teacher keeps a finite log.
        rest = torch.log((1 - top.exp().sum(-1)).clamp_min(1e-7))
        at_one = logp if temperature == 1 else torch.log_softmax(logits, dim=-1)
        nll = -at_one[:, :-1].gather(-1, rows[:, 1:, None])[..., 0]
        parts.append((index, top, rest, nll))
        bar.update(rows.numel())
    bar.close()
    return TeacherTargets(*(torch.cat(t) for t in zip(*parts)))


def kl_loss(logits: torch.Tensor, targets: TeacherTargets, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k bins plus the rest bin,
    at `temperature`, times temperature^2 (so gradients keep their size as T changes)."""
    logits = logits.float()
    logq = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    index, p_log, p_rest = targets.index[rows], targets.logp[rows], targets.rest[rows]
    q_top = logq.gather(-1, index)
    # The student's mass outside the teacher's top-k; clamped so a confident student keeps a finite log.
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-7))
    kl = (p_log.exp() * (p_log - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.mean() * temperature ** 2


def _nll(nll: torch.Tensor) -> float:
    return float(nll.double().mean())


# ---------------------------------------------------------------------------- training

def _hidden_loss(student_states, teacher_states) -> torch.Tensor:
    terms = [((s - t) ** 2).mean() / (t ** 2).mean() for s, t in zip(student_states, teacher_states)]
    return torch.stack(terms).mean()


def _heldout(hf, plan, ids, held, targets, temperature, batch, amp) -> tuple[float, float]:
    """(KL, perplexity) of the student on the held-out sequences."""
    from .layer_plan import plan_states

    kl_sum, nll = 0.0, []
    with torch.inference_mode(), amp():
        for i in range(0, len(held), batch):
            rows = held[i:i + batch]
            logits = hf.lm_head(plan_states(hf, ids[rows], plan)[0])
            kl_sum += kl_loss(logits, targets, rows, temperature).item() * len(rows)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll.append(-logp.gather(-1, ids[rows][:, 1:, None])[..., 0])
    return kl_sum / len(held), math.exp(_nll(torch.cat(nll)))


def _train(hf, plan, params, ids, train, held, targets, *, steps, lr, batch, temperature, hidden_weight, seed,
           time_limit, teacher, amp, progress) -> dict:
    from tqdm.auto import tqdm

    from .layer_plan import plan_states
    from .replace_training import lr_factor

    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(params, lr=lr)
    # The schedule's length: `steps`, or with a time limit as many as fit in it (re-estimated
    # from the measured pace after every step), so the cosine decay ends when the time does.
    horizon = {"steps": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, horizon["steps"]))
    t_loop = time.perf_counter()
    kl0, ppl0 = _heldout(hf, plan, ids, held, targets, temperature, batch, amp)
    history = [[0, None, kl0, ppl0]]
    best = {"kl": kl0, "ppl": ppl0, "step": 0, "values": [p.detach().clone() for p in params]}
    gate, bad_evals, step, interval, train_seconds, tokens = kl0, 0, 0, [], 0.0, 0
    keep = teacher[2][0] if teacher else ()
    bar = tqdm(total=steps, desc="heal", unit="step", disable=not progress)
    t_begin, out_of_time = time.perf_counter(), False
    while step < horizon["steps"] and bad_evals < PATIENCE and not out_of_time:
        perm = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(perm), batch):
            rows = perm[i:i + batch]
            t0 = time.perf_counter()
            with amp():
                h, states = plan_states(hf, ids[rows], plan, keep=keep)
                loss = kl_loss(hf.lm_head(h), targets, rows, temperature)
                if teacher:
                    t_hf, t_plan, (_, t_keep) = teacher
                    with torch.inference_mode():
                        t_states = plan_states(t_hf, ids[rows], t_plan, keep=t_keep)[1]
                    loss = loss + hidden_weight * _hidden_loss([s.float() for s in states],
                                                               [t.clone().float() for t in t_states])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            train_seconds += time.perf_counter() - t0
            tokens += ids[rows].numel()
            interval.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}", tok_s=f"{tokens / train_seconds:.0f}")
            elapsed = time.perf_counter() - t_begin
            out_of_time = time_limit is not None and elapsed >= time_limit
            if time_limit is not None and not out_of_time:
                horizon["steps"] = min(steps, max(step + 1, int(time_limit * step / elapsed)))
                bar.total = horizon["steps"]
            if step % EVAL_EVERY == 0 or step >= horizon["steps"] or out_of_time:
                kl, ppl = _heldout(hf, plan, ids, held, targets, temperature, batch, amp)
                history.append([step, sum(interval) / len(interval), kl, ppl])
                interval = []
                bar.set_postfix(loss=f"{history[-1][1]:.4g}", heldout_kl=f"{kl:.4g}", ppl=f"{ppl:.4g}",
                                tok_s=f"{tokens / train_seconds:.0f}")
                if kl < best["kl"]:
                    best = {"kl": kl, "ppl": ppl, "step": step, "values": [p.detach().clone() for p in params]}
                if kl < gate * (1 - 1e-3):
                    gate, bad_evals = kl, 0
                else:
                    bad_evals += 1
            if step >= horizon["steps"] or bad_evals >= PATIENCE or out_of_time:
                break
    bar.close()
    stopped = ("time_limit" if out_of_time or (time_limit is not None and step < steps and bad_evals < PATIENCE)
               else "patience" if bad_evals >= PATIENCE else "steps")
    with torch.no_grad():
        for p, value in zip(params, best["values"]):
            p.copy_(value)
            p.requires_grad_(False)
    return {"steps": step, "best_step": best["step"], "stopped": stopped, "last_lr": opt.param_groups[0]["lr"], "best_kl": best["kl"], "best_ppl": best["ppl"],
            "history": history, "seconds": train_seconds,
            "heldout_seconds": time.perf_counter() - t_loop - train_seconds,
            "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None}


# ---------------------------------------------------------------------------- writing

def trained_values(student: Model, hf, plan, trained: list[str], full: bool) -> dict:
    """{checkpoint tensor name: its trained fp32 value}. LoRA: the checkpoint's own weight plus the
    adapter's delta (so a bf16 training run never rounds the frozen weights), and the adapters
    are merged into `hf` too, which is then the written model (exactly so in fp32)."""
    if full:
        values = hf.state_dict()
        missing = [name for name in trained if name not in values]
        if missing:
            raise ShortrtError(f"trained tensors {missing[:3]} are not in the model")
        return {name: values[name].float().cpu() for name in trained}
    new = {}
    for step in plan:
        layer, prefix = hf.model.layers[step.index], f"model.layers.{step.index}."
        for path, delta in _lora.deltas(layer).items():
            new[prefix + path + ".weight"] = delta.cpu()
        _lora.merge(layer)
    missing = [name for name in new if name not in student.tensors]
    if missing:
        raise ShortrtError(f"trained tensors {missing[:3]} are not in {student.path}")
    original = student.read_tensors(list(new))
    return {name: original[name] + delta for name, delta in new.items()}


def _write(student: Model, new: dict, record: dict, out, overwrite: bool) -> Model:
    """The student's tensors with the trained ones (`new`) swapped in, its config, and its layer
    map with the healing record, written atomically."""
    from .layermap import LayerEntry
    from .pruning import layer_tensors
    from .safetensors_writer import TensorSource, tensor_bytes

    layer_map = dataclasses.replace(student.layer_map, healing=record)
    identity = [LayerEntry(i, attention=e.attention, mlp=e.mlp) for i, e in enumerate(student.layer_map.layers)]
    tensors = []
    for t in layer_tensors(student, identity):
        if t.name in new:
            t = TensorSource(t.name, t.dtype, t.shape, lambda v=new[t.name], d=t.dtype: tensor_bytes(v, d))
        tensors.append(t)
    return write_checkpoint(out, student, student.config(), layer_map, tensors, overwrite=overwrite)
