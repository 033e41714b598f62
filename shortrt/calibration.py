"""Calibration: how much each layer, sublayer and span of layers changes the hidden state.

One pass of the model (transformers, fp32, no grad) over calibration text. Hooks see, per
decoder layer i, its input h_i, the mid-layer residual m_i = h_i + attn(norm(h_i)) (the input of
``post_attention_layernorm``; in OLMo-2, whose norms follow the sublayers, m_i = h_i +
post_attention_layernorm(attn(h_i)), the input of ``mlp``) and its output h_{i+1}: each sublayer's
scores compare the residual stream before and after it. They feed each pair of [tokens, hidden]
states straight to the fused cosine kernel (shortrt.kernels.cosine), which returns running sums.
States are dropped as soon as no statistic needs them, so memory is one batch's states at most
and the accumulator holds O(layers x max_span) numbers whatever the number of tokens.

Reported per layer i, with means over all calibration tokens t:
  bi[i]      = 1 - mean_t cos(h_i, h_{i+1})             (ShortGPT's Block Influence)
  angular[i] = mean_t arccos(cos(h_i, h_{i+1})) / pi    (Gromov et al.'s angular distance)
  attn_bi[i] = 1 - mean_t cos(h_i, m_i)                 (attention sublayer, He et al.)
  mlp_bi[i]  = 1 - mean_t cos(m_i, h_{i+1})             (MLP sublayer)
and for spans, span_cos[s][n-1] = mean_t cos(h_s, h_{s+n}) (NaN where s + n > layers).

A Mamba block (shortrt.mamba) is h_{i+1} = h_i + mixer(norm(h_i)), one mixer and no sublayers: its
bi, angular and span scores are measured the same way on the block's input and output, attn_bi and
mlp_bi stay NaN, and data["score_kinds"] lists the kinds that exist.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ShortrtError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it, so that `import shortrt.calibrate` (and
# `from shortrt import calibrate, Scores`) stays fast for code that only reads scores files.

SCORES_FORMAT = "shortrt.scores/1"
# Layer-streaming calibration keeps the hidden states of max_span + 1 depths for a group of tokens
# within this many bytes (fp32); more tokens are calibrated in further groups.
DEFAULT_STATE_BYTES = 1536 << 20
# Architectures whose decoder layer computes m = h + attn(norm(h)); h' = m + mlp(post_attention_layernorm(m)),
# so the input of post_attention_layernorm is the mid-layer residual, and OLMo-2's, m = h +
# post_attention_layernorm(attn(h)); h' = m + post_feedforward_layernorm(mlp(m)), where it is the input of mlp
# (mid_residual_module), and Gemma 3's, m = h + post_attention_layernorm(attn(input_layernorm(h))); h' = m +
# post_feedforward_layernorm(mlp(pre_feedforward_layernorm(m))), where it is the input of pre_feedforward_layernorm.
_MID_RESIDUAL_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gemma3_text"}


def mid_residual_module(layer):
    """The submodule of a transformers decoder layer whose input is the mid-layer residual m."""
    from .layer_plan import is_post_norm, is_sandwich_norm

    if is_sandwich_norm(layer):
        return layer.pre_feedforward_layernorm
    return layer.mlp if is_post_norm(layer) else layer.post_attention_layernorm


@dataclass
class Scores:
    """The result of a calibration; see the module docstring for the definitions."""

    model: str
    num_layers: int
    bi: list[float]
    angular: list[float]
    attn_bi: list[float]
    mlp_bi: list[float]
    max_span: int
    span_cos: list[list[float]]
    span_angular: list[list[float]]
    data: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        # JSON has no NaN: unreachable spans are stored as null.
        def clean(value):
            if isinstance(value, list):
                return [clean(v) for v in value]
            return None if isinstance(value, float) and math.isnan(value) else value

        return {"format": SCORES_FORMAT, **{k: clean(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Scores":
        if d.get("format") != SCORES_FORMAT:
            raise ShortrtError(f"not a shortrt scores file: format is {d.get('format')!r}, expected {SCORES_FORMAT!r}")

        def nan(value):
            if isinstance(value, list):
                return [nan(v) for v in value]
            return math.nan if value is None else float(value)

        try:
            scores = cls(
                model=str(d["model"]), num_layers=int(d["num_layers"]), max_span=int(d["max_span"]),
                data=dict(d.get("data") or {}),
                **{k: nan(d[k]) for k in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular")},
            )
        except KeyError as exc:
            raise ShortrtError(f"scores file lacks the field {exc.args[0]!r}") from None
        for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
            if len(getattr(scores, name)) != scores.num_layers:
                raise ShortrtError(f"scores field {name!r} has {len(getattr(scores, name))} entries "
                                   f"for {scores.num_layers} layers")
        return scores

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scores file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ShortrtError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_json(d)


class SimilarityAccumulator:
    """Running fp64 sums of cos and arccos(cos)/pi for every statistic of a calibration.

    Memory: 3 x layers x 2 numbers for the (block, attention, MLP) scores plus
    layers x max_span x 2 for the span table; nothing grows with the number of tokens.
    """

    BLOCK, ATTENTION, MLP = 0, 1, 2

    def __init__(self, num_layers: int, max_span: int, backend: str = "auto"):
        import torch

        from .kernels.cosine import cosine_stats

        self._cosine_stats = cosine_stats
        self.num_layers, self.max_span, self.backend = num_layers, max_span, backend
        self.layer_sums = torch.zeros(3, num_layers, 2, dtype=torch.float64)
        self.span_sums = torch.zeros(num_layers, max_span, 2, dtype=torch.float64)
        self.layer_counts = torch.zeros(3, num_layers, dtype=torch.int64)
        self.span_counts = torch.zeros(num_layers, max_span, dtype=torch.int64)

    def _sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, sums = self._cosine_stats(x, y, backend=self.backend)
        return sums.cpu()

    def add_layer(self, kind: int, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the pair (x, y) to a layer score; returns its sums so a caller can reuse them."""
        sums = self._sums(x, y)
        self.layer_sums[kind, layer] += sums
        self.layer_counts[kind, layer] += x.shape[0]
        return sums

    def add_span(self, start: int, n: int, x: torch.Tensor, y: torch.Tensor,
                 sums: torch.Tensor | None = None) -> None:
        """Add the pair (h_start, h_start+n); sums, if given, are the already computed stats of (x, y)."""
        self.span_sums[start, n - 1] += self._sums(x, y) if sums is None else sums
        self.span_counts[start, n - 1] += x.shape[0]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer means [3, L, 2], span means [L, max_span, 2]); NaN where nothing was added."""
        import torch

        nan = torch.tensor(math.nan, dtype=torch.float64)
        layer = torch.where(self.layer_counts[..., None] > 0,
                            self.layer_sums / self.layer_counts.clamp_min(1)[..., None], nan)
        span = torch.where(self.span_counts[..., None] > 0,
                           self.span_sums / self.span_counts.clamp_min(1)[..., None], nan)
        return layer, span

    def num_values(self) -> int:
        return sum(t.numel() for t in (self.layer_sums, self.span_sums, self.layer_counts, self.span_counts))


class LayerStateHooks:
    """Forward hooks on a model's decoder layers that stream hidden-state pairs into an accumulator.

    Per batch it keeps the chain h_0 .. h_{i+1} only as far back as max_span needs, and the
    current layer's input and mid-layer residual until that layer's output arrives.
    """

    def __init__(self, layers, accumulator: SimilarityAccumulator, *, sublayers: bool):
        self.layers, self.acc, self.sublayers = list(layers), accumulator, sublayers
        self.handles = []
        self.reset()

    def reset(self) -> None:
        self.chain: dict[int, torch.Tensor] = {}  # depth j -> h_j as [tokens, hidden]
        self.layer_input: torch.Tensor | None = None
        self.mid: torch.Tensor | None = None
        self.next_layer = 0

    def __enter__(self) -> "LayerStateHooks":
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post_hook(i)))
            if self.sublayers:
                self.handles.append(mid_residual_module(layer).register_forward_pre_hook(self._mid_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.reset()

    @staticmethod
    def _flat(t) -> torch.Tensor:
        t = t[0] if isinstance(t, (tuple, list)) else t
        return t.detach().reshape(-1, t.shape[-1])

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            if i != self.next_layer:
                raise ShortrtError(f"decoder layer {i} ran out of order (expected layer {self.next_layer})")
            x = self._flat(args[0] if args else kwargs["hidden_states"])
            self.layer_input = x
            if i == 0:
                self.chain[0] = x
        return hook

    def _mid_hook(self, i: int):
        def hook(module, args):
            self.mid = self._flat(args[0])
            self.acc.add_layer(SimilarityAccumulator.ATTENTION, i, self.layer_input, self.mid)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            out = self._flat(output)
            acc = self.acc
            block = acc.add_layer(SimilarityAccumulator.BLOCK, i, self.layer_input, out)
            if self.sublayers:
                acc.add_layer(SimilarityAccumulator.MLP, i, self.mid, out)
            depth = i + 1
            self.chain[depth] = out
            for n in range(1, min(acc.max_span, depth) + 1):
                start = self.chain[depth - n]
                # The span of one layer is the block pair itself when the layer's input is the
                # previous layer's output in memory (as in transformers): reuse its sums.
                same = _same_memory(start, self.layer_input)
                acc.add_span(depth - n, n, start, out, sums=block if same else None)
            self.chain.pop(depth - acc.max_span, None)  # no later span starts there
            self.layer_input = self.mid = None
            self.next_layer = depth
        return hook


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def calibration_sequences(tokenizer, texts: list[str], n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The first n_tokens tokens of the texts (EOS between texts), cut into seq_len-token sequences.

    The last sequence is shorter when the tokens run out; fewer than n_tokens are used only
    when the texts hold fewer.
    """
    import torch

    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        if len(ids) >= n_tokens:
            break
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = ids[:n_tokens]
    if not ids:
        raise ShortrtError("the calibration text produced no tokens")
    return [torch.tensor(ids[i:i + seq_len], dtype=torch.long) for i in range(0, len(ids), seq_len)]


def sequence_batches(sequences: list[torch.Tensor], batch_size: int):
    """Consecutive sequences of equal length stacked into [batch, seq] tensors."""
    import torch

    batch: list[torch.Tensor] = []
    for seq in sequences:
        if batch and (len(batch) == batch_size or seq.shape[0] != batch[0].shape[0]):
            yield torch.stack(batch)
            batch = []
        batch.append(seq)
    if batch:
        yield torch.stack(batch)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_options(*, n_tokens, seq_len, batch_size, backend, device="cpu"):
    """calibrate's own argument checks (shared with shortrt.iterative), before anything is loaded;
    returns the checked torch.device."""
    from .devices import resolve_device
    from .kernels.cosine import BACKENDS, KernelUnavailableError, require_triton

    for name, value in (("n_tokens", n_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        _check_positive(name, value)
    if backend not in BACKENDS:
        raise ValueError(f"unknown cosine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    if backend == "triton":
        try:
            require_triton(dev)  # fail before loading anything
        except KernelUnavailableError as exc:
            raise ShortrtError(str(exc)) from None
    return dev


def check_seq_len(config: dict, seq_len: int) -> None:
    max_positions = config.get("max_position_embeddings")
    if max_positions and seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")


def calibrate(model, texts=None, *, n_tokens: int = 32768, seq_len: int = 512, max_span: int | None = None,
              batch_size: int = 4, backend: str = "auto", stream: bool | None = None,
              state_bytes: int = DEFAULT_STATE_BYTES, device: str = "cpu", progress: bool = True) -> Scores:
    """Measure every layer's Block Influence, angular distance, sublayer scores and span similarities.

    model: "default", a checkpoint directory, a .gguf file or a shortrt Model.
    texts: None (the default text mix, shortrt.data), a path or list of paths (.txt/.jsonl files,
    directories), or a list of strings.
    n_tokens: calibration tokens (fewer if the texts hold fewer); seq_len: tokens per sequence;
    max_span: longest span in the depth x depth table (default: all depths); batch_size: sequences
    per forward pass; backend: the cosine kernel's ("auto", "triton", "torch").
    stream: run one decoder layer at a time with only its weights in memory (shortrt.streaming),
    over groups of tokens whose states of max_span + 1 depths fit in `state_bytes`; None (default)
    streams when the model's fp32 weights would take more than a quarter of the available memory.
    The scores are the same either way (to fp32 rounding: tests/test_calibrate.py).
    device: "cpu" (the model in fp32), "cuda" or "cuda:N" (the model in bf16 on that GPU, the
    cosine kernel compiled there; checked before anything is loaded).
    """
    import torch
    from tqdm.auto import tqdm

    from . import data
    from .checkpoint import load

    from .devices import work_dtype

    dev = check_options(n_tokens=n_tokens, seq_len=seq_len, batch_size=batch_size, backend=backend, device=device)
    ckpt = load(model, runtime=False)  # calibrate/prune-only families (Mamba) too
    if not ckpt.runtime_supported:
        if stream:
            raise ShortrtError(f"{ckpt.model_config.architecture}: layer streaming (--stream) runs transformer "
                               "decoder layers; calibrate this model in memory (--no-stream)")
        stream = False
    config = ckpt.config()
    num_layers = int(config["num_hidden_layers"])
    if max_span is None:
        max_span = num_layers
    _check_positive("max_span", max_span)
    _check_positive("state_bytes", state_bytes)
    if max_span > num_layers:
        raise ValueError(f"max_span {max_span} exceeds the model's {num_layers} layers")
    check_seq_len(config, seq_len)

    texts, description = data.calibration_texts("default" if texts is None else texts)
    sequences = calibration_sequences(ckpt.tokenizer(), texts, n_tokens, seq_len)
    used_tokens = sum(seq.shape[0] for seq in sequences)

    sublayers = config.get("model_type") in _MID_RESIDUAL_ARCHS
    acc = SimilarityAccumulator(num_layers, max_span, backend)
    if stream is None:
        stream = should_stream(ckpt)
    started = time.perf_counter()
    if stream:
        _calibrate_streaming(ckpt, sequences, batch_size, acc, sublayers=sublayers, state_bytes=state_bytes,
                             device=dev, progress=progress)
    else:
        hf = ckpt.load_hf(work_dtype(dev)).to(dev)
        decoder = hf.base_model  # the stack without lm_head: its logits are not needed
        with torch.no_grad(), LayerStateHooks(decoder.layers, acc, sublayers=sublayers) as hooks, \
                tqdm(total=used_tokens, unit="tok", desc="calibrate", disable=not progress) as bar:
            for batch in sequence_batches(sequences, batch_size):
                decoder(input_ids=batch.to(dev), use_cache=False)
                hooks.reset()  # drop this batch's states before the next forward allocates its own
                bar.update(batch.numel())
    seconds = time.perf_counter() - started

    layer, span = acc.means()
    kinds = {}
    if not ckpt.runtime_supported:  # say which scores exist: a Mamba block has no sublayers
        from .mamba import SCORE_KINDS

        kinds = {"architecture": ckpt.model_config.architecture, "score_kinds": list(SCORE_KINDS)}
    return Scores(
        model=ckpt.name,
        num_layers=num_layers,
        bi=(1.0 - layer[acc.BLOCK, :, 0]).tolist(),
        angular=layer[acc.BLOCK, :, 1].tolist(),
        attn_bi=(1.0 - layer[acc.ATTENTION, :, 0]).tolist(),
        mlp_bi=(1.0 - layer[acc.MLP, :, 0]).tolist(),
        max_span=max_span,
        span_cos=span[..., 0].tolist(),
        span_angular=span[..., 1].tolist(),
        data={"source": description, "n_tokens": used_tokens, "seq_len": seq_len,
              "n_sequences": len(sequences), "seconds": round(seconds, 2), "backend": backend,
              "streamed": bool(stream), "device": dev.type, "dtype": str(work_dtype(dev)).removeprefix("torch."),
              **kinds},
    )


def should_stream(ckpt) -> bool:
    """Whether the model's fp32 weights would take more than a quarter of the available memory."""
    fp32_bytes = sum(4 * math.prod(shape) for _, _, shape in ckpt.tensors.values())
    return fp32_bytes > available_memory() // 4


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (16 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def _calibrate_streaming(ckpt, sequences, batch_size: int, acc: SimilarityAccumulator, *, sublayers: bool,
                         state_bytes: int, device, progress: bool) -> None:
    """The statistics `LayerStateHooks` gathers, with the loops turned around: for each group of
    batches, every layer in turn over all of the group's batches, its weights loaded for that turn
    only (shortrt.streaming). A group holds the hidden states of max_span + 1 depths (the span
    table needs them) in `state_bytes`; each further group reads the weights once more."""
    import torch
    from tqdm.auto import tqdm

    from .layer_plan import run_layer
    from .streaming import LayerStream

    from .devices import work_dtype

    stream = LayerStream(ckpt, work_dtype(device), device=device)
    hidden = ckpt.model_config.hidden
    batches = list(sequence_batches(sequences, batch_size))
    per_token = (acc.max_span + 1) * hidden * stream.dtype.itemsize
    group_tokens = max(state_bytes // per_token, max(b.numel() for b in batches))
    groups, size = [[]], 0
    for batch in batches:
        if groups[-1] and size + batch.numel() > group_tokens:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += batch.numel()
    total = sum(b.numel() for b in batches) * stream.num_layers
    flat = LayerStateHooks._flat
    with torch.no_grad(), tqdm(total=total, unit="tok", unit_scale=True, disable=not progress,
                               desc=f"calibrate (streaming, {len(groups)} group{'s' * (len(groups) > 1)})") as bar:
        for group in groups:
            states = [stream.embed(b) for b in group]
            chain = {0: states}  # depth j -> h_j of every batch of the group
            for i in range(stream.num_layers):
                with stream.layer(i) as layer:
                    outs = []
                    for b, h in enumerate(states):
                        mid, out = run_layer(layer, h, stream.rotary(h), stream.mask(h))
                        x, y = flat(h), flat(out)
                        block = acc.add_layer(acc.BLOCK, i, x, y)
                        if sublayers:
                            acc.add_layer(acc.ATTENTION, i, x, flat(mid))
                            acc.add_layer(acc.MLP, i, flat(mid), y)
                        for n in range(1, min(acc.max_span, i + 1) + 1):
                            acc.add_span(i + 1 - n, n, flat(chain[i + 1 - n][b]), y, sums=block if n == 1 else None)
                        outs.append(out)
                        del mid
                        bar.update(h.shape[0] * h.shape[1])
                states = chain[i + 1] = outs
                chain.pop(i + 1 - acc.max_span, None)  # no later span starts there
