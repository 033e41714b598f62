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

    cfg = model.config()
    try:
        ckpt = _C.Checkpoint(str(model.path))
    except _C.FormatError as exc:
        raise CheckpointError(f"corrupt checkpoint {model.path}: {exc}") from None
    tensors = {name: ckpt.info(name) for name in ckpt.names()}
    n_params = sum(math.prod(shape) for _, shape, _ in tensors.values())
    dtypes = sorted({dtype for dtype, _, _ in tensors.values()})
    meta = model.shortrt_json()
    return {
        "path": str(model.path),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "num_attention_heads": cfg.get("num_attention_heads"),
        "num_key_value_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
        "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // cfg["num_attention_heads"]),
        "vocab_size": cfg.get("vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "num_parameters": n_params,
        "weight_bytes": ckpt.total_bytes,
        "dtypes": dtypes,
        "num_tensors": len(tensors),
        "tensors": tensors,
        "shortrt": meta,
    }


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
    meta = info["shortrt"]
    if meta:
        layers = meta.get("layers", [])
        kept = [e["source"] for e in layers]
        no_attn = [e["source"] for e in layers if not e.get("attention", True)]
        rows += [
            ("pruned from", f"{meta.get('source')} ({meta.get('source_num_layers')} layers, method {meta.get('method')})"),
            ("retained layers", ", ".join(map(str, kept))),
            ("removed layers", ", ".join(map(str, meta.get("removed", []))) or "-"),
        ]
        if no_attn:
            rows.append(("layers without attention", ", ".join(map(str, no_attn))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.tensors:
        print()
        for name, (dtype, shape, nbytes) in info["tensors"].items():
            print(f"{name:<60} {dtype:<5} {str(list(shape)):<16} {nbytes:>12,}")
    return 0
