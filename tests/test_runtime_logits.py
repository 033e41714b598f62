"""fp32 correctness of the C++ runtime against transformers and shortrt.reference (tiny models).

Tolerance: max |logit difference| / max |reference logit| <= 1e-4 throughout.
"""
import json

import numpy as np
import pytest
import torch

from runtime_models import hf_logits, make_tiny, rel_err, write_pruned
from shortrt.engine import Engine
from shortrt.reference import ReferenceModel

TOL = 1e-4
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4]


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"num_key_value_heads": 4}),              # plain multi-head attention
    ("llama", {"head_dim": 32}),                        # head_dim from config, != hidden / heads
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("mistral", {}),
    ("qwen2", {}),                                      # q/k/v biases
    ("qwen3", {}),                                      # q/k RMSNorm per head before RoPE
    ("qwen3", {"head_dim": 32}),                        # Qwen3's head_dim is independent of hidden / heads
])
def test_fp32_logits_match_transformers(tmp_path, arch, extra):
    path, model = make_tiny(tmp_path / arch, arch, **extra)
    eng = Engine(path, threads=2)
    assert rel_err(eng.logits(IDS), hf_logits(model, IDS)) <= TOL


@pytest.mark.parametrize("disk_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_runs_in_fp32(tmp_path, disk_dtype):
    import transformers

    path, _ = make_tiny(tmp_path / "half", dtype=disk_dtype)
    # Reload so that transformers upcasts the stored weights (and recomputes its RoPE table in fp32).
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert rel_err(Engine(path).logits(IDS), hf_logits(model, IDS)) <= TOL


def test_kv_cache_decoding_equals_full_forward_at_every_step(tmp_path):
    path, _ = make_tiny(tmp_path / "m")
    eng = Engine(path, threads=2)
    full = eng.logits(IDS)             # one prefill pass
    stepwise = eng.logits(IDS, chunk=1)  # token by token through the KV cache
    chunked = eng.logits(IDS, chunk=5)   # prefill in chunks that continue the cache
    assert rel_err(stepwise, full) <= 1e-5
    assert rel_err(chunked, full) <= 1e-5


def test_greedy_generation_equals_transformers(tmp_path):
    path, model = make_tiny(tmp_path / "m")
    prompt = IDS[:6]
    out = Engine(path).generate_ids(prompt, max_new_tokens=24, stop=[])
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert out == ref


def test_skip_list_equals_pruned_checkpoint_and_transformers(tmp_path):
    dense, _ = make_tiny(tmp_path / "dense", num_hidden_layers=6)
    keep = [0, 2, 3, 5]
    pruned = write_pruned(dense, tmp_path / "pruned", keep)
    import transformers

    hf_pruned = transformers.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    ref = hf_logits(hf_pruned, IDS)
    skipped = Engine(dense, skip_layers=[1, 4])
    assert skipped.num_layers == 4 and skipped.layers_run == keep
    assert rel_err(skipped.logits(IDS), ref) <= TOL
    eng = Engine(pruned)
    assert eng.num_layers == 4
    assert rel_err(eng.logits(IDS), ref) <= TOL
    # Greedy decoding with the remapped KV cache equals transformers' on the pruned checkpoint.
    with torch.no_grad():
        hf_tokens = hf_pruned.generate(torch.tensor([IDS[:5]]), max_new_tokens=16, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert eng.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == hf_tokens
    assert skipped.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == hf_tokens


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_reference_model_matches_transformers(tmp_path, arch):
    path, model = make_tiny(tmp_path / "q", arch)
    ref = ReferenceModel.load(path)(torch.tensor([IDS]))[0].numpy()
    assert rel_err(ref, hf_logits(model, IDS)) <= TOL


def test_qwen3_pruned_runs_greedy_like_transformers(tmp_path):
    """Qwen3 through the pipeline: calibrate (its mid-layer residual hooks), prune 2 of 6 layers with
    shortrt.prune (q_norm/k_norm travel with their layer), then the pruned checkpoint in transformers
    (its KV cache) and in the runtime give the same greedy tokens and logits within TOL."""
    import transformers

    from shortrt import calibrate, prune, select

    dense, _ = make_tiny(tmp_path / "dense", "qwen3", num_hidden_layers=6, head_dim=32, tokenizer=True)
    # One text: the Qwen tokenizer class adds an <|endoftext|> past this tiny vocabulary, which
    # calibration would put between texts.
    texts = [" ".join(["Once upon a time there was a little model that ran on a lean runtime."] * 8)]
    scores = calibrate(dense, texts, n_tokens=128, seq_len=32, progress=False)
    streamed = calibrate(dense, texts, n_tokens=128, seq_len=32, progress=False, stream=True)
    assert np.allclose(scores.bi, streamed.bi, atol=1e-6) and np.allclose(scores.attn_bi, streamed.attn_bi, atol=1e-6)
    pruned = prune(dense, select(scores, remove=2), tmp_path / "pruned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(pruned.path, dtype=torch.float32).eval()
    eng = Engine(pruned.path, threads=2)
    assert eng.num_layers == 4
    assert rel_err(eng.logits(IDS), hf_logits(hf, IDS)) <= TOL
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([IDS[:5]]), max_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert eng.generate_ids(IDS[:5], max_new_tokens=16, stop=[]) == hf_tokens


def test_attention_less_and_mlp_less_layers_equal_reference(tmp_path):
    dense, _ = make_tiny(tmp_path / "dense", num_hidden_layers=5)
    # new layer 1 keeps only its MLP (no attention tensors, no KV slot); new layer 2 only its attention.
    pruned = write_pruned(dense, tmp_path / "sub", [0, 1, 3, 4], flags={1: (False, True), 2: (True, False)})
    eng = Engine(pruned, threads=2)
    assert eng.num_layers == 4 and eng.num_attention_layers == 3
    ref = ReferenceModel.load(pruned)
    expected = ref(torch.tensor([IDS]))[0].numpy()
    assert rel_err(eng.logits(IDS), expected) <= TOL
    assert rel_err(eng.logits(IDS, chunk=1), expected) <= TOL
    assert eng.generate_ids(IDS[:5], max_new_tokens=12, stop=[]) == ref.greedy(IDS[:5], 12)
    # The same plan from a skip list on top of shortrt.json.
    skipped = Engine(pruned, skip_layers=[1])
    assert skipped.num_attention_layers == 3
    assert rel_err(skipped.logits(IDS), ReferenceModel.load(pruned, skip_layers=[1])(torch.tensor([IDS]))[0].numpy()) <= TOL


def test_kv_cache_bytes_count_retained_attentions_only(tmp_path):
    dense, _ = make_tiny(tmp_path / "dense", num_hidden_layers=6)
    per_slot = 2 * 4 * 100 * 3 * 2 * 16  # K and V * float32 * max_seq * max_batch * kv_heads * head_dim
    assert Engine(dense, max_seq=100, max_batch=3).kv_cache_bytes == 6 * per_slot
    assert Engine(dense, max_seq=100, max_batch=3, skip_layers=[0, 5]).kv_cache_bytes == 4 * per_slot
    sub = write_pruned(dense, tmp_path / "sub", [0, 1, 2], flags={1: (False, True)})
    assert Engine(sub, max_seq=100, max_batch=3).kv_cache_bytes == 2 * per_slot


def test_skipped_layers_are_never_read(tmp_path):
    """A skipped layer's tensors may even be corrupt (NaN): they must not influence anything."""
    from safetensors.torch import load_file, save_file

    dense, model = make_tiny(tmp_path / "dense", num_hidden_layers=3)
    tensors = load_file(dense / "model.safetensors")
    for name in tensors:
        if name.startswith("model.layers.1."):
            tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    pruned = write_pruned(dense, tmp_path / "p", [0, 2])
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    out = Engine(dense, skip_layers=[1]).logits(IDS)
    assert np.isfinite(out).all()
    assert rel_err(out, hf_logits(hf, IDS)) <= TOL


def test_ref_kernel_path_gives_the_same_logits(tmp_path):
    """SHORTRT_KERNELS=ref (scalar twins) vs the auto-selected fast path, fp32/bf16/int8."""
    import subprocess
    import sys

    path, _ = make_tiny(tmp_path / "m")
    script = ("import json,sys; from shortrt.engine import Engine; ids = json.loads(sys.argv[2]); "
              "print(json.dumps({f'{d}/{c}': Engine(sys.argv[1], dtype=d).logits(ids, chunk=c).tolist() "
              "for d in ('fp32','bf16','int8') for c in (0, 1)}))")
    results = {}
    for mode in ("ref", "auto"):
        env = dict(__import__("os").environ, SHORTRT_KERNELS=mode)
        proc = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(IDS)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        results[mode] = {k: np.array(v) for k, v in json.loads(proc.stdout).items()}
    for key in results["ref"]:  # prefill (chunk 0) and decode (chunk 1) paths of every dtype
        assert rel_err(results["auto"][key], results["ref"][key]) <= 1e-4, key
