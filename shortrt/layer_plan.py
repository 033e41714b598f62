"""Run a transformers decoder following a layer plan: which layers, with which sublayers.

A plan is a tuple of shortrt.checkpoint.Steps, each naming a decoder layer of the loaded model and whether its
attention and MLP run. The same dense model in memory then stands for any pruned variant
(skipped layers are never touched; an attention-less step computes h + mlp(norm(h)) only),
which is how the quality benchmark scores many layer maps without writing checkpoints, and
how checkpoints with attention-less layers (which transformers cannot build) are evaluated.

Plans that start with the same steps share that computation: `forward_plans` runs the common
prefix once and branches from the saved hidden state.
"""
from __future__ import annotations

import torch

from .checkpoint import Model, Step, load
from .errors import CheckpointError, ShortrtError

__all__ = ["Step", "dense_plan", "load_for_plan", "forward_plans", "plan_logits", "plan_states", "attention_mask",
           "causal_mask", "causal_masks", "masks_for", "rotary_for", "plan_steps", "run_layer"]


def dense_plan(num_layers: int) -> tuple[Step, ...]:
    return tuple(Step(i) for i in range(num_layers))


def load_for_plan(model, skip_layers=()):
    """(transformers model, plan) for any shortrt checkpoint, including attention-less layers."""
    m = load(model)
    plan = m.plan(skip_layers)
    if m.layer_map.transformers_compatible:
        return m.load_hf(), plan
    return _load_partial(m), plan


def _load_partial(m: Model):
    """Build the architecture from config.json and load the tensors that exist.

    Attention-less layers have no self_attn/input_layernorm tensors (the contract checked that
    the tensor set is exactly what shortrt.json says); their modules keep random init but the
    plan never runs them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(m.path)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(m.read_tensors(), strict=False)
    if unexpected:
        raise CheckpointError(f"{m.path} has tensors the architecture does not: {unexpected[:5]}")
    if m.model_config.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


def attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean may-attend mask as the additive mask every attention implementation accepts."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def rotary_for(rotary, h, position_ids):
    """The rotary (cos, sin) of a model's rotary module at position_ids, or, where the layers have two
    RoPEs (Gemma 3: a local base for sliding_attention layers, the global one for full_attention),
    a dict of them by layer type (run_layer picks its layer's)."""
    types = getattr(rotary, "layer_types", None)
    if types is None:
        return rotary(h, position_ids=position_ids)
    return {t: rotary(h, position_ids, t) for t in types}


def masks_for(config, mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """The additive form of a boolean may-attend mask [rows, 1, T, T]; where some layers attend
    through a sliding window (Gemma 3's sliding_attention), a dict by layer type, the sliding one
    also hiding keys config.sliding_window or more positions before the query (transformers:
    kv_pos > q_pos - window)."""
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return attention_mask(mask, dtype)
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    near = (pos[:, None, :, None] - pos[:, None, None, :]) < config.sliding_window
    return {"full_attention": attention_mask(mask, dtype), "sliding_attention": attention_mask(mask & near, dtype)}


def causal_masks(config, T: int, dtype: torch.dtype, device=None):
    """masks_for a plain causal batch at positions 0..T-1 (broadcasts over rows)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    return masks_for(config, causal, torch.arange(T, device=device)[None], dtype)


def _of_layer(layer, value):
    """value, or its entry for the layer's attention type when given by type (rotary_for, masks_for)."""
    return value[layer.self_attn.layer_type] if isinstance(value, dict) else value


def is_post_norm(layer) -> bool:
    """Whether a transformers decoder layer norms its sublayers' outputs (OLMo-2: no input_layernorm,
    post_attention_layernorm after the attention, post_feedforward_layernorm after the MLP)."""
    return not hasattr(layer, "input_layernorm") and hasattr(layer, "post_feedforward_layernorm")


def is_sandwich_norm(layer) -> bool:
    """Whether a transformers decoder layer norms each sublayer's input and output (Gemma 3:
    input_layernorm / post_attention_layernorm around the attention, pre_ / post_feedforward_layernorm
    around the MLP)."""
    return hasattr(layer, "pre_feedforward_layernorm")


def run_layer(layer, h, pe, mask, *, attention: bool = True, mlp: bool = True):
    """One decoder layer (a transformers module of the Llama family, Phi-3 or OLMo-2) on h [rows, T, hidden]:
    (mid-layer residual h + attn(norm(h)) -- OLMo-2: h + norm(attn(h)) --, output), either sublayer
    skipped when told. pe: the rotary (cos, sin) for the rows' positions; mask: additive,
    broadcastable to [rows, 1, T, T]."""
    post = is_post_norm(layer)
    pe, mask = _of_layer(layer, pe), _of_layer(layer, mask)
    if is_sandwich_norm(layer):  # Gemma 3: h + post_norm(sublayer(pre_norm(h))) for each sublayer
        if attention:
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask)
            h = h + layer.post_attention_layernorm(a)
        mid = h
        if mlp:
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return mid, h
    if attention:
        x = h if post else layer.input_layernorm(h)
        a, _ = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=mask)
        h = h + (layer.post_attention_layernorm(a) if post else a)
    mid = h
    if mlp:
        h = h + (layer.post_feedforward_layernorm(layer.mlp(h)) if post else layer.mlp(layer.post_attention_layernorm(h)))
    return mid, h


def causal_mask(T: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The additive causal mask [1, 1, T, T] of a plain batch (every row at positions 0..T-1)."""
    return attention_mask(torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None], dtype)


def _run_steps(hf, h, steps, pe, mask):
    layers = hf.model.layers
    for step in steps:
        _, h = run_layer(layers[step.index], h, pe, mask, attention=step.attention, mlp=step.mlp)
    return h


@torch.inference_mode()
def forward_plans(hf, input_ids, position_ids, mask, plans: list[tuple[Step, ...]]) -> list[torch.Tensor]:
    """Final-norm hidden states [rows, T, hidden] for each plan; steps that several plans
    take in the same order from the start are computed once (a walk over the plans' prefix tree).

    mask: [rows, 1, T, T] bool (True = may attend).
    """
    n_layers = len(hf.model.layers)
    for plan in plans:
        bad = [s.index for s in plan if not 0 <= s.index < n_layers]
        if bad:
            raise ShortrtError(f"plan refers to layers {bad} but the model has {n_layers}")
    h0 = hf.model.embed_tokens(input_ids)
    pe = rotary_for(hf.model.rotary_emb, h0, position_ids)
    additive = masks_for(hf.config, mask, position_ids, h0.dtype)
    outs: list[torch.Tensor | None] = [None] * len(plans)

    def walk(h, depth: int, members: list[int]) -> None:
        groups: dict[Step, list[int]] = {}
        for p in members:
            if len(plans[p]) == depth:
                outs[p] = hf.model.norm(h)
            else:
                groups.setdefault(plans[p][depth], []).append(p)
        for step, group in groups.items():
            walk(_run_steps(hf, h, (step,), pe, additive), depth + 1, group)

    walk(h0, 0, list(range(len(plans))))
    return outs


def plan_steps(hf, input_ids: torch.Tensor, plan: tuple[Step, ...], start: torch.Tensor | None = None):
    """Run `plan` over a plain causal batch (every row at positions 0..T-1) one step at a time,
    yielding (p, state entering step p, state leaving it), each [rows, T, hidden], in the caller's
    grad mode. start: the state entering plan[0] in place of the token embeddings (a prefix of
    layers computed earlier: shortrt.iterative keeps it between rounds)."""
    rows, T = input_ids.shape
    h = hf.model.embed_tokens(input_ids) if start is None else start
    pe = rotary_for(hf.model.rotary_emb, h, torch.arange(T, device=h.device).repeat(rows, 1))
    additive = causal_masks(hf.config, T, h.dtype, h.device)  # broadcasts over rows
    for p, step in enumerate(plan):
        out = _run_steps(hf, h, (step,), pe, additive)
        yield p, h, out
        h = out


def plan_states(hf, input_ids: torch.Tensor, plan: tuple[Step, ...], keep=()):
    """(final-norm hidden states [rows, T, hidden], [hidden state after plan step p for p in keep])
    of a plain causal batch (every row at positions 0..T-1). Unlike forward_plans it runs in the
    caller's grad mode, so training (shortrt.healing) backpropagates through it."""
    h = hf.model.embed_tokens(input_ids)
    wanted, kept = set(keep), {}
    for p, _, h in plan_steps(hf, input_ids, plan, start=h):
        if p in wanted:
            kept[p] = h
    return hf.model.norm(h), [kept[p] for p in keep]


@torch.inference_mode()
def plan_logits(hf, input_ids: torch.Tensor, plan: tuple[Step, ...]) -> torch.Tensor:
    """Causal logits [rows, T, vocab] of a plain batch under `plan` (for tests and checks)."""
    rows, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).repeat(rows, 1)
    mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril().expand(rows, 1, T, T)
    (h,) = forward_plans(hf, input_ids, pos, mask, [plan])
    return hf.lm_head(h)
