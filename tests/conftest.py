"""Shared fixtures: a tiny random Llama for fast checks and the real default model for end-to-end ones."""
import os

# Triton kernels run on the CPU through Triton's interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep the default-model conversion in one place per test session unless the user chose a cache.
os.environ.setdefault("SHORTRT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shortrt"))

import pytest


def make_tiny_llama(path, *, num_layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128,
                    vocab=256, seed=0, tie=True):
    """Save a random-init LlamaForCausalLM checkpoint (fp32 safetensors) to `path` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`shortrt ARGV` in this process: (exit code, stdout, stderr); argparse's exits become codes."""
    from shortrt.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def tensors_of(path):
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def read_meta(model) -> dict:
    """The shortrt.json a writer left, as raw JSON."""
    import json

    import shortrt

    return json.loads((shortrt.load(model).path / "shortrt.json").read_text())


@pytest.fixture
def tiny_llama(tmp_path):
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def default_model():
    import shortrt

    return shortrt.load("default")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are skipped, saying so."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "benchmarks/gpu_check.sh runs it on one")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch intra-op thread is faster than two (and far
    faster when the machine is busy). A module opts in with pytestmark = usefixtures("one_torch_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
