"""`shortrt info [MODEL]`: architecture, layer map, parameters and bytes, read through the C++ reader."""
from __future__ import annotations

import math

HELP = "print a checkpoint's architecture, layer map, parameter count and bytes"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="default",
                        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")


def describe(model) -> dict:
    """Facts about a checkpoint; every safetensors header is parsed and bounds-checked by shortrt._C."""
    from shortrt import _C
    from shortrt.errors import CheckpointError

    cfg = model.model_config
    try:
        ckpt = _C.Checkpoint(str(model.path))
    except _C.FormatError as exc:
        raise CheckpointError(f"corrupt checkpoint {model.path}: {exc}") from None
    tensors = {name: ckpt.info(name) for name in ckpt.names()}
    n_params = sum(math.prod(shape) for _, shape, _ in tensors.values())
    dtypes = sorted({dtype for dtype, _, _ in tensors.values()})
    return {
        "path": str(model.path),
        "architecture": cfg.architecture,
        "num_layers": cfg.n_layers,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_parameters": n_params,
        "weight_bytes": ckpt.total_bytes,
        "dtypes": dtypes,
        "num_tensors": len(tensors),
        "tensors": tensors,
        "layer_map": model.layer_map if model.is_pruned else None,
    }


def _g(value) -> str:
    """A number of the healing record (the contract only checks that the record is an object)."""
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def run(args) -> int:
    import shortrt

    model = shortrt.load(args.model)
    info = describe(model)
    rows = [
        ("model", str(model)),
        ("architecture", info["architecture"]),
        ("layers", info["num_layers"]),
        ("hidden size", info["hidden_size"]),
        ("intermediate size", info["intermediate_size"]),
        ("attention heads", info["num_attention_heads"]),
        ("KV heads", info["num_key_value_heads"]),
        ("head dim", info["head_dim"]),
        ("vocab", info["vocab_size"]),
        ("context", info["max_position_embeddings"]),
        ("tied embeddings", info["tie_word_embeddings"]),
        ("parameters", f"{info['num_parameters']:,} ({info['num_parameters'] / 1e6:.1f} M)"),
        ("weight bytes", f"{info['weight_bytes']:,} ({info['weight_bytes'] / 2**20:.1f} MiB, {', '.join(info['dtypes'])})"),
        ("tensors", info["num_tensors"]),
    ]
    lmap = info["layer_map"]
    if lmap is not None:
        no_attn = [e.source for e in lmap.layers if not e.attention]
        rows += [
            ("pruned from", f"{lmap.source} ({lmap.source_num_layers} layers, method {lmap.method})"),
            ("retained layers", ", ".join(str(e.source) for e in lmap.layers)),
            ("removed layers", ", ".join(map(str, lmap.removed)) or "-"),
        ]
        if no_attn:
            rows.append(("layers without attention", ", ".join(map(str, no_attn))))
        h = lmap.healing
        if h:
            what = "all layer weights" if h.get("mode") == "full" else f"LoRA rank {h.get('rank')}"
            rows.append(("healed", f"from {h.get('teacher')} ({what}, {h.get('steps')} steps): held-out KL "
                                   f"{_g(h.get('kl_before'))} -> {_g(h.get('kl_after'))}, perplexity "
                                   f"{_g(h.get('ppl_before'))} -> {_g(h.get('ppl_after'))}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.tensors:
        print()
        for name, (dtype, shape, nbytes) in info["tensors"].items():
            print(f"{name:<60} {dtype:<5} {str(list(shape)):<16} {nbytes:>12,}")
    return 0
