"""The tokenizer of an exported GGUF: `tokenizer.*` metadata and the chat template.

Two sources, in this order:
- the GGUF a checkpoint was converted from (the default model is one): its `tokenizer.*` keys are
  copied as they are, so llama.cpp tokenizes exactly as it did with the original file (a GGUF ->
  transformers -> tokenizer.json round trip loses details such as SmolLM's digit splitting);
- the checkpoint's tokenizer.json (byte-level BPE): tokens by id, their types, the merges, the
  special token ids, add_bos and the chat template (tokenizer_config.json or chat_template.jinja,
  read by the gguf package's SpecialVocab), and the pre-tokenizer named as llama.cpp names it.
Anything else (SentencePiece, WordPiece, an unrecognised pre-tokenizer) is refused with the
reason, since llama.cpp would tokenize it differently.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

# llama_token_type (llama.cpp include/llama.h)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# tokenizer.json pre_tokenizer shapes llama.cpp has a `tokenizer.ggml.pre` for (src/llama-vocab.cpp)
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN2_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or CheckpointError."""
    if pre is None:
        raise CheckpointError("tokenizer.json has no pre_tokenizer; export handles byte-level BPE tokenizers only")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise CheckpointError(f"tokenizer.json's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one export "
                          "can name for llama.cpp (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text "
                          "differently")


def add_from_gguf(writer, reader, vocab: int) -> bool:
    """Copy `reader`'s tokenizer.* keys when it holds `vocab` tokens; False if it does not."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab:
        return False
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    return True


def add_from_tokenizer_json(writer, path: Path, vocab: int) -> None:
    """tokenizer.* metadata from a checkpoint directory's tokenizer.json (byte-level BPE)."""
    import gguf

    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json (and no source GGUF to take a tokenizer from); "
                              "a GGUF without a tokenizer cannot run in llama.cpp")
    doc = json.loads(file.read_text(encoding="utf-8"))
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or (doc.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(f"{file}: a {model.get('type')} tokenizer with a "
                              f"{(doc.get('decoder') or {}).get('type')} decoder; export writes byte-level BPE "
                              "tokenizers only")
    pre = pre_tokenizer_name(doc.get("pre_tokenizer"))
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in doc.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= vocab:
        raise CheckpointError(f"{file} has token id {max(by_id)} but the model's vocab_size is {vocab}")
    tokens, types = [], []
    for i in range(vocab):  # ids the tokenizer never produces pad the embedding's rows
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab)
    if not special.merges:
        raise CheckpointError(f"{file}: no BPE merges found")
    special.add_to_gguf(writer, quiet=True)
