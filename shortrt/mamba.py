"""Mamba (transformers' MambaForCausalLM): calibrated and pruned by shortrt, run by transformers.

ShortGPT reports the same layer redundancy in state-space models. A Mamba block is

    h_{i+1} = h_i + mixer_i(norm_i(h_i))

with one mixer (in_proj, a causal depthwise conv1d, the selective scan, out_proj) and nothing
else: no attention and no MLP. So its scores are the block's (BI, angular distance) and the span
table over the residual stream; sublayer scores do not exist, and neither do the methods built on
them (`attention`). Removing blocks keeps the checkpoint a standard one: transformers builds each
block from its position, and a block's recurrent state (conv and SSM caches) belongs to it alone,
so nothing in the cache refers to a removed block.

shortrt's runtime does not run Mamba (shortrt.checkpoint.CALIBRATE_PRUNE_ONLY): load(path) refuses
it and load(path, runtime=False) returns a MambaModel, which calibrate, prune and eval take.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property

from .checkpoint import Model, _IGNORED_TENSOR, _tensor_headers, check_expected_tensors
from .errors import CheckpointError

ARCHITECTURE = "MambaForCausalLM"
LAYER_PREFIX = "backbone.layers."  # a block's tensors: backbone.layers.{i}.norm.weight, .mixer.*
LAYER_KEY = re.compile(rf"^{re.escape(LAYER_PREFIX)}(\d+)\.(.+)$")
# What a Mamba calibration measures (Scores fields); attn_bi and mlp_bi are left NaN.
SCORE_KINDS = ("bi", "angular", "span_cos", "span_angular")
# Selection methods that remove whole blocks, the only kind a Mamba model has.
METHODS = ("shortgpt", "span", "last", "random")


@dataclass(frozen=True)
class MambaConfig:
    """config.json of a MambaForCausalLM, the fields its tensors' shapes depend on."""
    architecture: str
    hidden: int
    intermediate: int
    n_layers: int
    vocab: int
    state_size: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    tie_embeddings: bool


def _positive(c: dict, key: str, fallback=None) -> int:
    v = c.get(key)
    if v is None:
        if fallback is None:
            raise CheckpointError(f"config.json: missing required field '{key}'")
        return fallback
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10**9:
        raise CheckpointError(f"config.json: '{key}' must be a positive integer, got {json.dumps(v)}")
    return v


def _flag(c: dict, key: str, fallback: bool) -> bool:
    v = c.get(key)
    if v is None:
        return fallback
    if not isinstance(v, bool):
        raise CheckpointError(f"config.json: '{key}' must be true or false, got {json.dumps(v)}")
    return v


def parse_config(c: dict) -> MambaConfig:
    """Validate a Mamba config.json (transformers' MambaConfig defaults where a field is absent)."""
    hidden = _positive(c, "hidden_size")
    n_layers = _positive(c, "num_hidden_layers", c.get("n_layer"))
    if c.get("n_layer") is not None and _positive(c, "n_layer") != n_layers:
        raise CheckpointError(f"config.json: n_layer {c['n_layer']} disagrees with num_hidden_layers {n_layers}")
    expand = _positive(c, "expand", 2)
    intermediate = _positive(c, "intermediate_size", expand * hidden)
    rank = c.get("time_step_rank", "auto")
    rank = math.ceil(hidden / 16) if rank == "auto" else _positive(c, "time_step_rank")
    act = c.get("hidden_act")
    if act is not None and not isinstance(act, str):
        raise CheckpointError(f"config.json: 'hidden_act' must be a string, got {json.dumps(act)}")
    return MambaConfig(ARCHITECTURE, hidden, intermediate, n_layers, _positive(c, "vocab_size"),
                       _positive(c, "state_size", 16), _positive(c, "conv_kernel", 4), rank,
                       _flag(c, "use_bias", False), _flag(c, "use_conv_bias", True),
                       _flag(c, "tie_word_embeddings", True))


def expected_tensors(cfg: MambaConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mamba checkpoint of `num_layers` blocks holds, with its shape (lm_head only when untied)."""
    h, d, n = cfg.hidden, cfg.intermediate, cfg.state_size
    out = {"backbone.embeddings.weight": (cfg.vocab, h), "backbone.norm_f.weight": (h,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab, h)
    for i in range(num_layers):
        p = f"backbone.layers.{i}."
        out.update({p + "norm.weight": (h,), p + "mixer.in_proj.weight": (2 * d, h),
                    p + "mixer.conv1d.weight": (d, 1, cfg.conv_kernel),
                    p + "mixer.x_proj.weight": (cfg.time_step_rank + 2 * n, d),
                    p + "mixer.dt_proj.weight": (d, cfg.time_step_rank), p + "mixer.dt_proj.bias": (d,),
                    p + "mixer.A_log": (d, n), p + "mixer.D": (d,), p + "mixer.out_proj.weight": (h, d)})
        if cfg.use_conv_bias:
            out[p + "mixer.conv1d.bias"] = (d,)
        if cfg.use_bias:
            out.update({p + "mixer.in_proj.bias": (2 * d,), p + "mixer.out_proj.bias": (h,)})
    return out


def check_tensors(cfg: MambaConfig, num_layers: int, found: dict, where) -> None:
    """The tensor set is exactly what config.json says (worded as shortrt.checkpoint.check_tensors)."""
    expected = expected_tensors(cfg, num_layers)
    for name in sorted(found):
        if name in expected or _IGNORED_TENSOR.search(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        m = LAYER_KEY.match(name)
        if m and int(m.group(1)) >= num_layers:
            raise CheckpointError(f"{where}: tensor '{name}' is for layer {m.group(1)} but config.json has "
                                  f"num_hidden_layers = {num_layers}")
        raise CheckpointError(f"{where}: unexpected tensor '{name}' (not part of a {cfg.architecture})")
    check_expected_tensors(where, expected, found)


@dataclass(frozen=True)
class MambaModel(Model):
    """A validated MambaForCausalLM checkpoint (calibrate, prune and eval take it; the runtime does not)."""
    runtime_supported = False
    layer_prefix = LAYER_PREFIX

    @cached_property
    def model_config(self) -> MambaConfig:
        try:
            return parse_config(self._config_doc)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

    @cached_property
    def tensors(self) -> dict:
        found = _tensor_headers(self.path, *self._weight_layout)
        num_layers = self.model_config.n_layers
        if not self.layer_map.transformers_compatible:  # a shortrt.json written by hand: Mamba has no sublayers
            raise CheckpointError(f"{self.path}: shortrt.json drops a sublayer, but a Mamba block has only its mixer")
        check_tensors(self.model_config, num_layers, {k: (d, s) for k, (_, d, s) in found.items()}, self.path)
        return found


def check_block_map(layer_map) -> None:
    """A Mamba layer map removes whole blocks only (no attention or MLP to drop, no replacement)."""
    if not layer_map.transformers_compatible:
        raise ValueError("a Mamba block has one mixer and no attention or MLP sublayer: remove whole blocks "
                         f"(methods {', '.join(METHODS)}, or --layers without --method attention)")
    kinds = {e.kind for e in layer_map.layers} - {"layer"}
    if kinds:
        raise ValueError(f"a Mamba checkpoint keeps plain blocks only, not {sorted(kinds)}")


def forward_blocks(hf, input_ids, steps):
    """Hidden states after norm_f of a transformers MambaForCausalLM running only the blocks `steps`
    (shortrt.checkpoint.Step indices, in order) on [batch, tokens] ids, without a cache."""
    backbone = hf.backbone
    h = backbone.embeddings(input_ids)
    for step in steps:
        h = backbone.layers[step.index](h)
    return backbone.norm_f(h)
