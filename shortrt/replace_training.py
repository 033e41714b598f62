"""Train one module to stand in for a span of decoder layers (LLM-Streamline, Chen et al. 2024).

The dense model runs once over calibration sequences; hooks keep the span's input h_s and
output h_e (the model stops right after the span, so later layers and the unembedding never
run). For models larger than memory the same states come from a layer stream
(shortrt.streaming: one decoder layer's weights at a time, `capture_span_states_streaming`).
A module then learns h_s -> h_e:

- kind="layer": one decoder layer (attention + MLP), a copy of the span layer that already maps
  h_s to h_e best, so the result is a standard decoder layer;
- kind="mlp":   h + mlp(rmsnorm(h)), the MLP half of such a layer (no attention), so its
  parameter budget is exactly one layer's MLP.

Loss: MSE on h_e, optionally plus cosine_weight * (1 - cos). Adam with a cosine learning-rate
decay, a fixed seed, and early stop on a held-out slice of the sequences (the best weights on
that slice are kept, which may be the initial ones: training never makes the held-out loss worse).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ShortrtError

KINDS = ("layer", "mlp")
# Defaults measured on SmolLM2-135M with 8 layers replaced (benchmarks/results/replace/summary.md):
# at 150 steps a peak rate of 4e-3 beat 1e-3 and 2e-3 for both kinds; 300 steps beat 150; doubling
# the tokens to 64k changed little at 300 steps (train and held-out losses stay close).
DEFAULT_STEPS = 300
DEFAULT_LR = 4e-3
DEFAULT_BATCH = 4
# Below this relative gain an evaluation counts as "no better" for the patience counter (the
# best weights are still kept): the last 0.1 % is not worth more minutes of CPU.
_MIN_REL_GAIN = 1e-3


class MLPBlock(nn.Module):
    """h + mlp(post_attention_layernorm(h)) -- OLMo-2: h + post_feedforward_layernorm(mlp(h)); Gemma 3:
    h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))) --: a decoder layer without its attention.

    Its parameter names are those of the layer's MLP half, so its state_dict slots into a
    checkpoint as an attention-less layer.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        from .layer_plan import is_post_norm, is_sandwich_norm

        self.post_norm, self.sandwich = is_post_norm(layer), is_sandwich_norm(layer)
        if self.sandwich:
            self.pre_feedforward_layernorm = copy.deepcopy(layer.pre_feedforward_layernorm)
            self.post_feedforward_layernorm = copy.deepcopy(layer.post_feedforward_layernorm)
        elif self.post_norm:
            self.post_feedforward_layernorm = copy.deepcopy(layer.post_feedforward_layernorm)
        else:
            self.post_attention_layernorm = copy.deepcopy(layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(layer.mlp)

    def forward(self, hidden: torch.Tensor, **_) -> torch.Tensor:
        if self.sandwich:
            return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        if self.post_norm:
            return hidden + self.post_feedforward_layernorm(self.mlp(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@dataclass
class SpanStates:
    """The span's input and output hidden states, [n_seq, seq_len, hidden] float32 each."""

    inputs: torch.Tensor
    targets: torch.Tensor
    seconds: float


@dataclass
class TrainResult:
    module: nn.Module
    kind: str
    init_layer: int                 # the span layer the module started from
    steps: int                      # optimizer steps run (fewer than asked when stopped early)
    best_step: int                  # step of the kept weights (0 = the initial weights)
    train_loss: float               # mean training loss over the last evaluation interval
    heldout_loss: float             # of the kept weights
    heldout_loss_at_init: float
    heldout_loss_identity: float    # plain removal: the span output predicted by its input
    init_candidates: dict = field(default_factory=dict)  # span layer -> held-out loss as init
    history: list = field(default_factory=list)  # (step, mean train loss, held-out loss) per evaluation
    n_train: int = 0                # sequences
    n_heldout: int = 0
    capture_seconds: float = 0.0
    train_seconds: float = 0.0


class _StopForward(Exception):
    """Raised by the hook after the span's last layer: nothing after the span is needed."""


def capture_span_states(hf, token_batches, span: list[int], *, progress: bool = True) -> SpanStates:
    """Run the dense transformers model `hf` over token_batches ([batch, T] ids, equal T) up to
    the end of `span` and return the span's input and output states."""
    from tqdm.auto import tqdm

    layers = hf.model.layers
    start, last = span[0], span[-1]
    inputs, targets = [], []

    def pre_hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        inputs.append(x.detach().float().clone())

    def post_hook(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        targets.append(out.detach().float().clone())
        raise _StopForward

    t0 = time.perf_counter()
    handles = [layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True),
               layers[last].register_forward_hook(post_hook)]
    try:
        with torch.no_grad():
            for ids in tqdm(token_batches, desc=f"capture layers {start}-{last}", unit="batch",
                            disable=not progress):
                try:
                    hf.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    if not inputs:
        raise ShortrtError("no calibration sequences to capture")
    return SpanStates(torch.cat(inputs), torch.cat(targets), time.perf_counter() - t0)


def capture_span_states_streaming(stream, token_batches, span: list[int], *, progress: bool = True) -> SpanStates:
    """capture_span_states from a shortrt.streaming.LayerStream: every batch through layers
    0..span[-1], one layer's weights in memory at a time (the states of all batches are kept:
    tokens x hidden x 4 bytes, three times)."""
    from tqdm.auto import tqdm

    from .layer_plan import run_layer

    start, last = span[0], span[-1]
    t0 = time.perf_counter()
    token_batches = list(token_batches)
    if not token_batches:
        raise ShortrtError("no calibration sequences to capture")
    states, inputs = [stream.embed(ids) for ids in token_batches], None
    with torch.no_grad(), tqdm(total=last + 1, desc=f"capture layers {start}-{last} (streaming)", unit="layer",
                               disable=not progress) as bar:
        for i in range(last + 1):
            if i == start:
                inputs = [h.float() for h in states]
            with stream.layer(i) as layer:
                states = [run_layer(layer, h, stream.rotary(h), stream.mask(h))[1] for h in states]
            bar.update(1)
    return SpanStates(torch.cat(inputs), torch.cat([h.float() for h in states]), time.perf_counter() - t0)


class HFLayers:
    """What training a replacement needs of the source model, from a transformers model in memory."""

    def __init__(self, hf):
        self.rotary_emb, self.hidden, self.config = hf.model.rotary_emb, hf.config.hidden_size, hf.config
        self.device = hf.model.embed_tokens.weight.device
        self._layers = hf.model.layers

    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, i: int) -> nn.Module:
        """A copy of decoder layer i (the caller owns it)."""
        return copy.deepcopy(self._layers[i])


class StreamLayers:
    """The same from a shortrt.streaming.LayerStream: layer i's weights are read for each copy."""

    def __init__(self, stream):
        self.stream, self.rotary_emb, self.config = stream, stream.rotary_emb, stream.skeleton.config
        self.hidden, self.device = stream.model.model_config.hidden, stream.device

    def num_layers(self) -> int:
        return self.stream.num_layers

    def layer(self, i: int) -> nn.Module:
        with self.stream.layer(i) as layer:
            return copy.deepcopy(layer)


def _layers_of(source):
    return source if isinstance(source, (HFLayers, StreamLayers)) else HFLayers(source)


def make_module(source, layer_index: int, kind: str) -> nn.Module:
    """The starting module: a copy of decoder layer `layer_index` (kind "layer") or its MLP half,
    in fp32, on the source's device. source: a transformers model, HFLayers or StreamLayers."""
    layer = _layers_of(source).layer(layer_index)
    module = layer if kind == "layer" else MLPBlock(layer)
    return module.float().eval()


class _LayerRunner:
    """Calls a decoder layer (or an MLPBlock) on [batch, T, hidden] states at positions 0..T-1,
    with a causal mask and the model's rotary embeddings computed once (by attention type where the
    layers have two kinds, Gemma 3: each layer gets its own type's RoPE and mask)."""

    def __init__(self, source, seq_len: int):
        from .layer_plan import causal_masks, rotary_for

        layers = _layers_of(source)
        device = layers.device
        example = torch.zeros(1, seq_len, layers.hidden, device=device)
        positions = torch.arange(seq_len, device=device)[None]
        with torch.no_grad():
            pe = rotary_for(layers.rotary_emb, example, positions)
            detach = lambda p: tuple(t.detach() for t in p)  # noqa: E731
            self.position_embeddings = {k: detach(v) for k, v in pe.items()} if isinstance(pe, dict) else detach(pe)
        # An additive mask works with every attention implementation (eager, sdpa); [1, 1, T, T]
        # broadcasts over the batch.
        self.mask = causal_masks(layers.config, seq_len, torch.float32, device)
        self.positions = positions

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, MLPBlock):
            return module(x)
        pe, mask = self.position_embeddings, self.mask
        if isinstance(pe, dict):
            pe = pe[module.self_attn.layer_type]
        if isinstance(mask, dict):
            mask = mask[module.self_attn.layer_type]
        out = module(x, attention_mask=mask, position_ids=self.positions, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out


def span_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float = 0.0) -> torch.Tensor:
    loss = nn.functional.mse_loss(pred, target)
    if cosine_weight:
        cos = nn.functional.cosine_similarity(pred, target, dim=-1)
        loss = loss + cosine_weight * (1 - cos).mean()
    return loss


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over the first 5 % of the steps (Adam's first
    updates on a pretrained layer are the largest and, at a high rate, overshoot), then cosine
    decay to 10 % so the last steps settle."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(step - warmup, steps - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _heldout_loss(run, module, states: SpanStates, idx: torch.Tensor, batch: int, cosine_weight: float) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(idx), batch):
            b = idx[i:i + batch]
            x = states.inputs[b]
            pred = x if module is None else run(module, x)
            total += span_loss(pred, states.targets[b], cosine_weight).item() * len(b)
    return total / len(idx)


def _check_settings(kind, steps, lr, batch, cosine_weight, heldout_fraction, eval_every, patience) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    for name, value in (("steps", steps), ("batch", batch), ("eval_every", eval_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(cosine_weight, (int, float)) and math.isfinite(cosine_weight) and cosine_weight >= 0):
        raise ValueError(f"cosine_weight must be a number >= 0, got {cosine_weight!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction!r}")


def train_replacement(hf, span, token_batches, *, kind: str = "layer", steps: int = DEFAULT_STEPS,
                      lr: float = DEFAULT_LR, batch: int = DEFAULT_BATCH, cosine_weight: float = 0.0,
                      heldout_fraction: float = 0.125, eval_every: int = 25, patience: int = 4, seed: int = 0,
                      progress: bool = True) -> TrainResult:
    """Train a module mapping the input of layers `span` of `hf` to their output.

    hf: the dense transformers model (float32), or a shortrt.streaming.LayerStream over the dense
    checkpoint (states captured and layers read one at a time). span: contiguous layer indices.
    token_batches: [batch, T] token id tensors, all with the same T (calibration sequences).
    steps: most optimizer steps (each on `batch` sequences); eval_every: steps between
    held-out evaluations; patience: evaluations without a gain of 0.1 % before stopping.
    """
    _check_settings(kind, steps, lr, batch, cosine_weight, heldout_fraction, eval_every, patience)
    from .streaming import LayerStream

    span = [int(i) for i in span]
    streamed = isinstance(hf, LayerStream)
    n_layers = hf.num_layers if streamed else len(hf.model.layers)
    if not span or span != list(range(span[0], span[-1] + 1)) or not 0 <= span[0] <= span[-1] < n_layers:
        raise ShortrtError(f"span must be contiguous layer indices within 0..{n_layers - 1}, got {span}")
    token_batches = list(token_batches)
    lengths = {int(b.shape[-1]) for b in token_batches}
    if len(lengths) > 1:
        raise ShortrtError(f"calibration sequences must all have the same length, got lengths {sorted(lengths)}")

    if streamed:
        states = capture_span_states_streaming(hf, token_batches, span, progress=progress)
        hf = StreamLayers(hf)
    else:
        states = capture_span_states(hf, token_batches, span, progress=progress)
    return fit_replacement(hf, span, states, kind=kind, steps=steps, lr=lr, batch=batch,
                           cosine_weight=cosine_weight, heldout_fraction=heldout_fraction,
                           eval_every=eval_every, patience=patience, seed=seed, progress=progress)


def fit_replacement(hf, span: list[int], states: SpanStates, *, kind: str = "layer", steps: int = DEFAULT_STEPS,
                    lr: float = DEFAULT_LR, batch: int = DEFAULT_BATCH, cosine_weight: float = 0.0,
                    heldout_fraction: float = 0.125, eval_every: int = 25, patience: int = 4, seed: int = 0,
                    progress: bool = True) -> TrainResult:
    """The training half of train_replacement, on already captured span states.
    hf: a transformers model, or HFLayers / StreamLayers."""
    from tqdm.auto import tqdm

    _check_settings(kind, steps, lr, batch, cosine_weight, heldout_fraction, eval_every, patience)
    n_seq, seq_len = states.inputs.shape[:2]
    if n_seq < 2:
        raise ShortrtError(f"training a replacement needs at least 2 calibration sequences, got {n_seq}; "
                           "give more tokens or a shorter seq_len")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_seq, generator=gen)
    n_held = min(n_seq - 1, max(1, round(n_seq * heldout_fraction)))
    held, train = order[:n_held], order[n_held:]
    hf = _layers_of(hf)
    run = _LayerRunner(hf, seq_len)

    # Start from whichever layer of the span already maps the span best.
    candidates = {i: _heldout_loss(run, make_module(hf, i, kind), states, held, batch, cosine_weight) for i in span}
    init_layer = min(candidates, key=lambda i: (candidates[i], i))
    init_loss = candidates[init_layer]
    identity_loss = _heldout_loss(run, None, states, held, batch, cosine_weight)

    module = make_module(hf, init_layer, kind).train()
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    best_state, best_loss, best_step = copy.deepcopy(module.state_dict()), init_loss, 0
    gate_loss, bad_evals, step = init_loss, 0, 0
    interval: list[float] = []
    history: list[tuple[int, float, float]] = []
    train_loss = math.nan
    bar = tqdm(total=steps, desc=f"train {kind} for layers {span[0]}-{span[-1]}", disable=not progress)
    # The seed drives dropout, if the model has any, without touching the caller's random state.
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        while step < steps and bad_evals < patience:
            perm = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(perm), batch):
                b = perm[i:i + batch]
                loss = span_loss(run(module, states.inputs[b]), states.targets[b], cosine_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                interval.append(loss.item())
                bar.update(1)
                if step % eval_every == 0 or step == steps:
                    train_loss, interval = sum(interval) / len(interval), []
                    module.eval()
                    held_loss = _heldout_loss(run, module, states, held, batch, cosine_weight)
                    module.train()
                    history.append((step, train_loss, held_loss))
                    bar.set_postfix(train=f"{train_loss:.4g}", heldout=f"{held_loss:.4g}")
                    if held_loss < best_loss:
                        best_loss, best_step = held_loss, step
                        best_state = copy.deepcopy(module.state_dict())
                    if held_loss < gate_loss * (1 - _MIN_REL_GAIN):
                        gate_loss, bad_evals = held_loss, 0
                    else:
                        bad_evals += 1
                if step >= steps or bad_evals >= patience:
                    break
    bar.close()
    if interval:
        train_loss = sum(interval) / len(interval)
    module.load_state_dict(best_state)
    module.eval()
    for p in params:
        p.requires_grad_(False)
    return TrainResult(module=module, kind=kind, init_layer=init_layer, steps=step, best_step=best_step,
                       train_loss=train_loss, heldout_loss=best_loss, heldout_loss_at_init=init_loss,
                       heldout_loss_identity=identity_loss, init_candidates=candidates, history=history,
                       n_train=len(train), n_heldout=n_held, capture_seconds=states.seconds,
                       train_seconds=time.perf_counter() - t0)
