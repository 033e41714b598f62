"""Replace a removed span of layers with one trained module (LLM-Streamline, Chen et al. 2024).

The span [s, s+n) is cut out; a lightweight module learns to map the span's
input hidden state to its output hidden state, on states captured from the
dense model over calibration text:

- kind="layer": one decoder layer, initialised from the layer of the span that
  already maps best; the checkpoint stays a standard Llama (transformers loads it).
- kind="mlp":   a SwiGLU MLP with its RMSNorm and residual, h + mlp(norm(h)),
  initialised from a span layer's MLP, so its parameter budget equals one
  layer's MLP. It is stored as an attention-less layer (shortrt runs it).

Loss is MSE (optionally plus a cosine term) on the span output; Adam with a
fixed seed; early stop on a held-out slice of the sequences, keeping the best
weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from .errors import ShortrtError

KINDS = ("layer", "mlp")


@dataclass
class TrainResult:
    module: torch.nn.Module
    init_layer: int
    steps: int
    train_loss: float
    heldout_loss: float
    heldout_loss_at_init: float
    heldout_loss_identity: float  # plain removal: predicting the span output by its input
    seconds: float


def _span_of(layer_map) -> list[int]:
    removed = sorted(layer_map.removed)
    if not removed:
        raise ShortrtError("the layer map removes no layers: there is no span to replace")
    if removed != list(range(removed[0], removed[-1] + 1)):
        raise ShortrtError(
            f"a replacement needs one contiguous removed span (select(..., method='span')); "
            f"this layer map removes {removed}"
        )
    if any(not e.attention or not e.mlp for e in layer_map.layers):
        raise ShortrtError("a replacement cannot be combined with attention or MLP sublayer pruning")
    return removed


class _MLPBlock(torch.nn.Module):
    """h + mlp(rmsnorm(h)): an attention-less decoder layer."""

    def __init__(self, layer):
        super().__init__()
        self.post_attention_layernorm = copy.deepcopy(layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(layer.mlp)

    def forward(self, hidden, **_):
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Captured:
    """Span inputs/targets of calibration sequences, plus what a decoder layer needs to run."""

    def __init__(self, inputs, targets, layer_kwargs):
        self.inputs = inputs  # [n_seq, seq_len, hidden]
        self.targets = targets
        self.layer_kwargs = layer_kwargs  # position embeddings etc., identical for every batch of seq_len


def _capture(hf, token_batches, start, end, progress) -> _Captured:
    from tqdm.auto import tqdm

    layers = hf.model.layers
    inputs, targets, kwargs_seen = [], [], {}

    def pre_hook(_module, args, kwargs):
        inputs.append(args[0].detach().clone() if args else kwargs["hidden_states"].detach().clone())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")})

    def post_hook(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        targets.append(out.detach().clone())

    h1 = layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = layers[end - 1].register_forward_hook(post_hook)
    try:
        with torch.no_grad():
            for ids in tqdm(token_batches, desc="capturing span states", disable=not progress, unit="batch"):
                hf(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return _Captured(torch.cat(inputs), torch.cat(targets), kwargs_seen)


def _loss(pred, target, cosine_weight):
    loss = torch.nn.functional.mse_loss(pred, target)
    if cosine_weight:
        cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
        loss = loss + cosine_weight * (1 - cos).mean()
    return loss


def _run(module, x, layer_kwargs):
    kw = dict(layer_kwargs)
    mask = kw.get("attention_mask")
    if mask is not None and mask.shape[0] not in (1, x.shape[0]):
        kw["attention_mask"] = mask[:1].expand(x.shape[0], *mask.shape[1:])
    pe = kw.get("position_embeddings")
    if pe is not None:
        kw["position_embeddings"] = tuple(t[:1].expand(x.shape[0], *t.shape[1:]) for t in pe)
    if "position_ids" in kw:
        kw["position_ids"] = kw["position_ids"][:1].expand(x.shape[0], -1)
    out = module(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def _eval_loss(module, data: _Captured, idx, batch, cosine_weight):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(idx), batch):
            b = idx[i : i + batch]
            pred = _run(module, data.inputs[b], data.layer_kwargs)
            total += _loss(pred, data.targets[b], cosine_weight).item() * len(b)
            count += len(b)
    return total / max(count, 1)


def train_replacement(hf, span, token_batches, *, kind="layer", steps=300, lr=3e-4, batch=4,
                      cosine_weight=0.0, heldout_fraction=0.125, eval_every=25, patience=4,
                      seed=0, progress=True) -> TrainResult:
    """Train a module mapping the input of layers `span` to their output. See the module docstring."""
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    t0 = time.time()
    start, end = span[0], span[-1] + 1
    data = _capture(hf, token_batches, start, end, progress)
    n_seq = data.inputs.shape[0]
    if n_seq < 2:
        raise ShortrtError("training a replacement needs at least 2 calibration sequences")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_seq, generator=gen)
    n_held = max(1, int(round(n_seq * heldout_fraction)))
    held, train = order[:n_held], order[n_held:]

    def make(layer_idx):
        layer = hf.model.layers[layer_idx]
        return copy.deepcopy(layer) if kind == "layer" else _MLPBlock(layer)

    # Start from whichever layer of the span already maps the span best.
    candidates = [(_eval_loss(make(i), data, held, batch, cosine_weight), i) for i in span]
    init_loss, init_layer = min(candidates)
    identity = torch.nn.Identity()
    identity_loss = _eval_loss(lambda x, **_: identity(x), data, held, batch, cosine_weight)

    torch.manual_seed(seed)
    module = make(init_layer).train()
    for p in module.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    best_state, best_loss, bad_evals, step, last_train = copy.deepcopy(module.state_dict()), init_loss, 0, 0, math.nan
    bar = tqdm(total=steps, desc=f"training {kind} replacement for layers {start}-{end - 1}", disable=not progress)
    while step < steps:
        perm = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(perm), batch):
            b = perm[i : i + batch]
            loss = _loss(_run(module, data.inputs[b], data.layer_kwargs), data.targets[b], cosine_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_train = loss.item()
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                module.eval()
                held_loss = _eval_loss(module, data, held, batch, cosine_weight)
                module.train()
                bar.set_postfix(train=f"{last_train:.4g}", heldout=f"{held_loss:.4g}")
                if held_loss < best_loss:
                    best_loss, bad_evals = held_loss, 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    bad_evals += 1
            if step >= steps or bad_evals >= patience:
                break
        if bad_evals >= patience:
            break
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return TrainResult(module, init_layer, step, last_train, best_loss, init_loss, identity_loss, time.time() - t0)
