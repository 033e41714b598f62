"""A checkpoint one decoder layer at a time: memory flat in the model's depth and size.

    stream = LayerStream(load("big-model"))
    h = stream.embed(input_ids)               # only the rows of the tokens used
    with stream.layer(i) as layer:            # layer i's weights, read just for its turn
        mid, h = run_layer(layer, h, stream.rotary(h), stream.mask(h))

The architecture comes from config.json as a transformers model built on the meta device (no
weights); `layer(i)` fills decoder layer i with its tensors read by Model.read_rows (pread, never
memory-mapped, so the file's pages are not part of the process's resident set) in the compute
dtype, and empties it again on exit. Peak memory is one layer's weights plus what the caller
holds. Layer-streaming calibration (shortrt.calibration) runs on it.
"""
from __future__ import annotations

import contextlib

import torch

from .checkpoint import CHUNK_BYTES, Model
from .errors import CheckpointError

# Decoder layers that shortrt.layer_plan.run_layer runs (transformers' Llama family, Phi-3, OLMo-2).
STREAMED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                  "Olmo2ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"}


class LayerStream:
    def __init__(self, model: Model, dtype: torch.dtype = torch.float32, device="cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        arch = model.model_config.architecture
        if arch not in STREAMED_ARCHS:
            raise CheckpointError(f"layer streaming supports {', '.join(sorted(STREAMED_ARCHS))}, not {arch}")
        if not model.layer_map.transformers_compatible:
            raise CheckpointError(f"{model.path} has layers without attention or MLP; layer streaming runs "
                                  "whole decoder layers")
        config = AutoConfig.from_pretrained(model.path)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.num_layers = len(self.skeleton.model.layers)
        # Built off the meta device, so its buffers are real.
        self._rotary = type(self.skeleton.model.rotary_emb)(config=config).to(self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of input_ids [...] as [..., hidden] in the compute dtype. The table is
        scanned in pieces of CHUNK_BYTES, so memory holds one piece, not the (vocab x hidden) table.
        The rows are gathered on the CPU and the result moved to the stream's device."""
        name = "model.embed_tokens.weight"
        _, _, (vocab, hidden) = self.model.tensors[name]
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got {int(flat.min())}..{int(flat.max())}")
        out = torch.empty(flat.numel(), hidden, dtype=self.dtype)
        rows_per_piece = max(1, CHUNK_BYTES // (hidden * 4))
        for start in range(0, vocab, rows_per_piece):
            stop = min(vocab, start + rows_per_piece)
            hit = ((flat >= start) & (flat < stop)).nonzero().reshape(-1)
            if hit.numel():
                table = self.model.read_rows(name, start, stop, dtype=self.dtype)
                out[hit] = table[flat[hit] - start]
        scale = self.model.model_config.embed_scale
        if scale != 1.0:  # Gemma 3: times sqrt(hidden), a float32 scalar cast to the table's dtype as transformers does
            out = out * torch.tensor(scale, dtype=torch.float32).to(self.dtype)
        return out.reshape(*input_ids.shape, hidden).to(self.device)

    @property
    def rotary_emb(self):
        """The model's rotary-embedding module (real buffers, on the stream's device)."""
        return self._rotary

    def rotary(self, h: torch.Tensor):
        """(cos, sin) for a plain batch h [rows, T, hidden] at positions 0..T-1 (by layer type where
        the model has two RoPEs: layer_plan.rotary_for)."""
        from .layer_plan import rotary_for

        rows, T = h.shape[:2]
        return rotary_for(self._rotary, h, torch.arange(T, device=h.device).repeat(rows, 1))

    def mask(self, h: torch.Tensor):
        """The additive causal mask of a plain batch h [rows, T, hidden] (by layer type where some
        layers attend through a sliding window: layer_plan.causal_masks)."""
        from .layer_plan import causal_masks

        return causal_masks(self.skeleton.config, h.shape[1], h.dtype, h.device)

    @contextlib.contextmanager
    def layer(self, i: int):
        """Decoder layer i with its weights, freed again when the block ends."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer {i} out of range for a model with {self.num_layers} layers")
        module = self.skeleton.model.layers[i]
        prefix = f"model.layers.{i}."
        names = [n for n in self.model.tensors if n.startswith(prefix)]
        weights = {n[len(prefix):]: self.model.read_rows(n, dtype=self.dtype).to(self.device) for n in names}
        missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
        del weights
        if missing or unexpected:
            module.to_empty(device="meta")
            raise CheckpointError(f"{self.model.path}: layer {i}'s tensors do not match the architecture "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        try:
            yield module.eval()
        finally:
            module.to_empty(device="meta")
