"""Tiny random checkpoints (Llama, Mistral, Qwen2, Qwen3, OLMo-2, Phi-3, Gemma 3) and helpers for the runtime tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Widths are multiples of 32 so the same checkpoints also run in int8.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


IDS_SHORT = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64]

# Gemma 3's tiny model (tests/test_gemma3.py, tests/test_gpu_engine_families.py): 6 layers, window 8, pattern 3
# (layers 2 and 5 full), and a prompt of 40 tokens (5 windows).
GEMMA3_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, sliding_window=8, sliding_window_pattern=3,
                   query_pre_attn_scalar=24, rope_theta=10000.0, rope_local_base_freq=100.0,
                   max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA3_IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4, 310] * 2


def scale_weights(model: torch.nn.Module, std: float = 0.08) -> None:
    """Re-draw weights with a larger std so that logits are far from uniform (greedy ties impossible)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def make_tiny(path: Path, arch: str = "llama", seed: int = 0, dtype=torch.float32, tokenizer: bool = False,
              **overrides):
    """Saves a random-init checkpoint of `arch` to path; returns (path, transformers model in fp32)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    kwargs = dict(TINY)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    scale_weights(model)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    if tokenizer:
        save_tiny_tokenizer(path)
    return Path(path), model.float()


WORDS = "the a model ran on lean runtime once upon time little fox quick brown lazy dog over".split()


def prose(n_words=3000, seed=0) -> list[str]:
    """One text of `n_words` words drawn uniformly from WORDS (calibration / training text for tiny models)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n_words))]


def save_tiny_tokenizer(path: Path) -> None:
    """A byte-level BPE of 300 tokens (256 bytes + merges + specials) as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Once upon a time there was a little model that ran on a lean runtime.",
            "The quick brown fox jumps over the lazy dog. Héllo wörld, ünïcode ✓."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(Path(path) / "tokenizer.json"))


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute difference relative to the largest reference logit."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - ref).max() / np.abs(ref).max())


def write_pruned(src: Path, dst: Path, keep: list[int], flags: dict[int, tuple[bool, bool]] | None = None) -> Path:
    """A pruned checkpoint made by hand: layers `keep` of src renumbered 0..k-1, config trimmed,
    shortrt.json written; flags[new_index] = (attention, mlp) drops those tensors too."""
    from safetensors.torch import load_file, save_file

    from shortrt.checkpoint import sublayer_prefixes

    dst.mkdir(parents=True, exist_ok=True)
    flags = flags or {}
    owners = sublayer_prefixes(json.loads((src / "config.json").read_text()).get("model_type") == "olmo2")
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if not name.startswith("model.layers."):
            out[name] = t
            continue
        old = int(name.split(".")[2])
        if old not in keep:
            continue
        new = keep.index(old)
        attention, mlp = flags.get(new, (True, True))
        rest = name.split(".", 3)[3]
        if not attention and rest.startswith(owners["attention"]):
            continue
        if not mlp and rest.startswith(owners["mlp"]):
            continue
        out[name.replace(f"model.layers.{old}.", f"model.layers.{new}.")] = t.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    n_src = config["num_hidden_layers"]
    config["num_hidden_layers"] = len(keep)
    if "layer_types" in config:
        config["layer_types"] = [config["layer_types"][i] for i in keep]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    layers = [{"source": old, "kind": "layer", "attention": flags.get(i, (True, True))[0],
               "mlp": flags.get(i, (True, True))[1]} for i, old in enumerate(keep)]
    meta = {"format": "shortrt.layermap/1", "source": str(src), "source_num_layers": n_src, "method": "manual",
            "layers": layers, "removed": [i for i in range(n_src) if i not in keep]}
    (dst / "shortrt.json").write_text(json.dumps(meta, indent=2))
    for f in ("tokenizer.json",):
        if (src / f).exists():
            (dst / f).write_bytes((src / f).read_bytes())
    return dst
