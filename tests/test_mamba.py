"""Mamba (MambaForCausalLM): Block Influence and spans through transformers, layer removal writing a
checkpoint transformers loads, perplexity through transformers, and the runtime's refusals.

transformers runs Mamba's slow (pure torch) path here: no mamba-ssm / causal-conv1d kernels."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import shortrt
from conftest import run_cli, tensors_of
from runtime_models import prose, save_tiny_tokenizer
from shortrt import checkpoint
from shortrt.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS, SEQ, TOKENS = 6, 64, 256


def make_mamba(path, *, seed=0, **overrides):
    """A random-init MambaForCausalLM saved with save_pretrained (+ a tiny tokenizer); (path, model)."""
    import transformers

    kwargs = dict(vocab_size=300, hidden_size=64, state_size=8, num_hidden_layers=N_LAYERS, conv_kernel=4,
                  expand=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs)).eval()
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path, model


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    return make_mamba(tmp_path_factory.mktemp("mamba") / "dense")


@pytest.fixture(scope="module")
def text():
    return prose(2000)


@pytest.fixture(scope="module")
def scores(mamba, text):
    return shortrt.calibrate(mamba[0], text, n_tokens=TOKENS, seq_len=SEQ, batch_size=2, progress=False)


def token_ids(path, text, n_tokens):
    tok = checkpoint.load(path, runtime=False).tokenizer()
    return tok(text[0], add_special_tokens=False)["input_ids"][:n_tokens]


def test_block_influence_equals_transformers_hidden_states(mamba, text, scores):
    path, model = mamba
    ids = torch.tensor(token_ids(path, text, TOKENS)).reshape(-1, SEQ)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        # MambaModel's hidden_states are the blocks' outputs, then norm_f's; block 0's input is the embedding.
        states = [model.backbone.embeddings(ids)] + list(out.hidden_states[:N_LAYERS])
    flat = [h.reshape(-1, h.shape[-1]).double() for h in states]

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=-1).clamp(-1, 1)

    assert scores.num_layers == N_LAYERS and scores.data["n_tokens"] == TOKENS
    for i in range(N_LAYERS):
        c = cos(i, i + 1)
        assert scores.bi[i] == pytest.approx(1 - float(c.mean()), abs=1e-5)
        assert scores.angular[i] == pytest.approx(float((torch.arccos(c) / math.pi).mean()), abs=1e-5)
        for n in range(1, N_LAYERS - i + 1):
            assert scores.span_cos[i][n - 1] == pytest.approx(float(cos(i, i + n).mean()), abs=1e-5)
    assert min(scores.bi) > 1e-3  # the blocks do change the state: the comparison above is not of zeros
    # One mixer per block: no sublayer scores, and the scores say which kinds exist.
    assert all(math.isnan(v) for v in scores.attn_bi + scores.mlp_bi)
    assert scores.data["architecture"] == "MambaForCausalLM"
    assert scores.data["score_kinds"] == ["bi", "angular", "span_cos", "span_angular"]


def test_calibrate_command_writes_scores_with_a_progress_bar(mamba, text, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(text[0])
    rc, out, err = run_cli(["calibrate", mamba[0], "--data", data, "--tokens", 128, "--seq-len", SEQ,
                            "--out", tmp_path / "s.json"], capsys)
    assert rc == 0, err
    assert "calibrate" in err and "tok" in err  # the tqdm bar
    assert "one mixer and no attention or MLP sublayer" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["attn_bi"] == [None] * N_LAYERS and len(saved["bi"]) == N_LAYERS
    rc, _, err = run_cli(["calibrate", mamba[0], "--stream", "--out", tmp_path / "t.json"], capsys)
    assert rc != 0 and "MambaForCausalLM: layer streaming (--stream) runs transformer decoder layers" in err


def in_memory_deletion(model, keep):
    ref = copy.deepcopy(model)
    ref.backbone.layers = torch.nn.ModuleList([ref.backbone.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    return ref


def test_pruned_checkpoint_loads_in_transformers_like_layers_deleted_in_memory(mamba, scores, tmp_path):
    from transformers import AutoModelForCausalLM

    path, model = mamba
    lmap = shortrt.select(scores, remove=2, method="shortgpt")
    keep = [e.source for e in lmap.layers]
    pruned = shortrt.prune(path, lmap, tmp_path / "p2")
    assert isinstance(pruned, checkpoint.Model) and not pruned.runtime_supported
    config = json.loads((pruned.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["architectures"] == ["MambaForCausalLM"]
    names = set(tensors_of(pruned.path))
    assert {n.split(".")[2] for n in names if n.startswith("backbone.layers.")} == {"0", "1", "2", "3"}
    dense_tensors, pruned_tensors = tensors_of(path), tensors_of(pruned.path)
    for new, old in enumerate(keep):  # renumbered, bytes unchanged
        a, b = f"backbone.layers.{new}.mixer.in_proj.weight", f"backbone.layers.{old}.mixer.in_proj.weight"
        assert torch.equal(pruned_tensors[a], dense_tensors[b])
    meta = json.loads((pruned.path / "shortrt.json").read_text())
    assert meta["removed"] == lmap.removed and meta["source"] == str(path.resolve())
    assert "attn_bi" not in meta["scores"] and meta["scores"]["metric"] == "bi"

    hf = AutoModelForCausalLM.from_pretrained(pruned.path, dtype=torch.float32).eval()
    ref = in_memory_deletion(model, keep)
    ids = torch.tensor([[1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64]])
    with torch.no_grad():
        got, want = hf(ids, use_cache=False).logits, ref(ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5
    # Its recurrent cache lines up with the renumbered blocks: cached greedy decoding = uncached.
    with torch.no_grad():
        cached = hf.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = hf.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_prune_command_by_count_and_by_layers(mamba, scores, tmp_path, capsys):
    path, model = mamba
    scores.save(tmp_path / "s.json")
    rc, out, err = run_cli(["prune", path, "--scores", tmp_path / "s.json", "--ratio", 0.34, "--method", "span",
                            "--out", tmp_path / "span"], capsys)
    assert rc == 0, err
    assert "layers      4 of 6 kept\n" in out and "KV" not in out
    rc, out, err = run_cli(["prune", path, "--layers", "1,3", "--out", tmp_path / "manual"], capsys)
    assert rc == 0, err
    assert checkpoint.load(tmp_path / "manual", runtime=False).layer_map.removed == [1, 3]
    # Pruning the pruned checkpoint again composes the map relative to the dense model.
    again = shortrt.prune(tmp_path / "manual", shortrt.LayerMap.from_removed(4, [0]), tmp_path / "again")
    assert again.layer_map.removed == [0, 1, 3] and [e.source for e in again.layer_map.layers] == [2, 4, 5]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(again.path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        # (use_cache=False: the blocks deleted in memory keep their old layer_idx, which a cache would trip on)
        want = in_memory_deletion(model, [2, 4, 5])(ids, use_cache=False).logits
        assert (hf(ids, use_cache=False).logits - want).abs().max() < 1e-5


@pytest.mark.parametrize("args,phrase", [
    (["--remove", "2", "--method", "attention"], "--method attention is not available for MambaForCausalLM: "
                                                 "a Mamba block has one mixer and no attention or MLP sublayer"),
    (["--layers", "1", "--method", "attention"], "--method attention is not available for MambaForCausalLM"),
    (["--remove", "1", "--method", "iterative"], "--method iterative is not available for MambaForCausalLM"),
    (["--target-speedup", "1.2"], "--target-speedup measures shortrt's runtime, which does not run MambaForCausalLM"),
    (["--max-kv-bytes", "1M"], "--max-kv-bytes measures shortrt's runtime, which does not run MambaForCausalLM"),
])
def test_prune_refuses_what_a_mamba_block_lacks(mamba, scores, tmp_path, capsys, args, phrase):
    scores.save(tmp_path / "s.json")
    rc, _, err = run_cli(["prune", mamba[0], "--scores", tmp_path / "s.json", *args, "--out", tmp_path / "o"], capsys)
    assert rc != 0 and phrase in err
    assert not (tmp_path / "o").exists()


def test_selection_and_prune_api_refuse_sublayer_removal(mamba, scores, tmp_path):
    with pytest.raises(ValueError, match="needs the 'attn_bi' scores, which a MambaForCausalLM does not have "
                                         r"\(its scores: bi, angular, span_cos, span_angular\)"):
        shortrt.select(scores, remove=1, method="attention")
    lmap = shortrt.LayerMap.from_removed_attention(N_LAYERS, [2], method="manual-attention")
    with pytest.raises(ValueError, match="a Mamba block has one mixer and no attention or MLP sublayer"):
        shortrt.prune(mamba[0], lmap, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_n_layer_is_updated_with_num_hidden_layers(mamba, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(mamba[0], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_layer": N_LAYERS}))
    out = shortrt.prune(src, shortrt.LayerMap.from_removed(N_LAYERS, [0, 5]), tmp_path / "p")
    written = json.loads((out.path / "config.json").read_text())
    assert written["n_layer"] == written["num_hidden_layers"] == 4
    (src / "config.json").write_text(json.dumps({**config, "n_layer": 5}))
    with pytest.raises(CheckpointError, match="n_layer 5 disagrees with num_hidden_layers 6"):
        checkpoint.load(src, runtime=False)


@pytest.mark.parametrize("edit,phrase", [
    (lambda t: t.pop("backbone.layers.2.mixer.A_log"), "tensor 'backbone.layers.2.mixer.A_log' not found"),
    (lambda t: t.update({"backbone.layers.6.norm.weight": torch.ones(64)}),
     "tensor 'backbone.layers.6.norm.weight' is for layer 6 but config.json has num_hidden_layers = 6"),
    (lambda t: t.update({"backbone.layers.0.mixer.D": torch.ones(3)}),
     "tensor 'backbone.layers.0.mixer.D': expected shape [128], found [3]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2)}),
     "unexpected tensor 'model.layers.0.mlp.up_proj.weight' (not part of a MambaForCausalLM)"),
])
def test_a_mamba_checkpoint_holds_exactly_its_tensors(mamba, tmp_path, edit, phrase):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "bad"
    shutil.copytree(mamba[0], src)
    tensors = tensors_of(src)
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=phrase.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        checkpoint.load(src, runtime=False)


def window_ppl(model, ids, keep=None):
    """Perplexity over non-overlapping windows of SEQ tokens, each token after a window's first scored."""
    model = model if keep is None else in_memory_deletion(model, keep)
    nll, n = 0.0, 0
    for begin in range(0, len(ids), SEQ):
        window = torch.tensor([ids[begin:begin + SEQ]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(window, use_cache=False).logits[0, :-1].double(), dim=-1)
        nll -= float(logp.gather(1, window[0, 1:, None]).sum())
        n += window.shape[1] - 1
    return math.exp(nll / n), n


def test_eval_perplexity_runs_through_transformers_dense_and_pruned(mamba, text, tmp_path):
    path, model = mamba
    n_tokens = 160
    ids = token_ids(path, text, n_tokens + 1)
    dense = shortrt.evaluate(path, ["ppl"], ppl_data=text, n_tokens=n_tokens, seq_len=SEQ, stride=SEQ,
                             progress=False)
    want, n = window_ppl(model, ids)
    assert dense["tasks"]["ppl"]["tokens"] == n
    assert dense["tasks"]["ppl"]["ppl"] == pytest.approx(want, rel=1e-6)
    pruned = shortrt.prune(path, shortrt.LayerMap.from_removed(N_LAYERS, [3, 4]), tmp_path / "p")
    got = shortrt.evaluate(pruned, ["ppl"], ppl_data=text, n_tokens=n_tokens, seq_len=SEQ, stride=SEQ,
                           progress=False)
    assert got["tasks"]["ppl"]["ppl"] == pytest.approx(window_ppl(model, ids, [0, 1, 2, 5])[0], rel=1e-6)
    assert got["layers"] == 4 and got["tasks"]["ppl"]["ppl"] != pytest.approx(want, rel=1e-3)


def test_eval_scores_each_choice_after_its_context(mamba):
    from shortrt.eval_packing import Segment
    from shortrt.evaluation import _score_unpacked

    path, model = mamba
    hf = checkpoint.load(path, runtime=False).load_hf()
    seg = Segment([1, 40, 41, 42], [[7, 8], [9]])
    plan = checkpoint.load(path, runtime=False).plan()
    sums, counts = [torch.zeros(1, 3, dtype=torch.float64)], torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        _score_unpacked(hf, [seg], [plan], sums, counts, None)
        for k, choice in enumerate(seg.branches):
            ids = torch.tensor([seg.context + choice])
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
            want = sum(float(logp[len(seg.context) - 1 + t, tok]) for t, tok in enumerate(choice))
            assert float(sums[0][0, k + 1]) == pytest.approx(want, abs=1e-6)
    assert counts.tolist() == [[0, 2, 1]]


def test_the_runtime_refuses_mamba_before_any_work(mamba, scores, tmp_path, capsys):
    path = mamba[0]
    scores.save(tmp_path / "s.json")
    phrase = ("unsupported architecture 'MambaForCausalLM' (shortrt runs LlamaForCausalLM, MistralForCausalLM, "
              "Qwen2ForCausalLM, Qwen3ForCausalLM, Olmo2ForCausalLM, Phi3ForCausalLM, Gemma3ForCausalLM) -- "
              "shortrt can calibrate and prune it")
    for call in (lambda: shortrt.load(path), lambda: shortrt.Engine(path),
                 lambda: shortrt.Engine(checkpoint.load(path, runtime=False)),
                 lambda: checkpoint.check_runnable(path)):
        with pytest.raises(CheckpointError) as exc:
            call()
        assert phrase in str(exc.value) and "run the result in transformers" in str(exc.value)
    assert "MambaForCausalLM" in checkpoint.CALIBRATE_PRUNE_ONLY
    assert "MambaForCausalLM" not in checkpoint.ARCHITECTURES
    for argv in (["generate", path, "-p", "hi"], ["serve", path, "--port", "0"], ["info", path],
                 ["export", path, "--to", "gguf", "--out", tmp_path / "m.gguf"],
                 ["replace", path, "--scores", tmp_path / "s.json", "--remove", 2, "--out", tmp_path / "r"],
                 ["heal", path, "--out", tmp_path / "h"], ["lm-eval", path, "--tasks", "arc_easy"]):
        rc, _, err = run_cli(argv, capsys)
        assert rc != 0 and phrase in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # nothing written
    # A config.json naming only the model_type is refused alike.
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    with pytest.raises(CheckpointError, match="unsupported architecture 'MambaForCausalLM'"):
        checkpoint.parse_config(config)
