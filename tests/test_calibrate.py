"""shortrt.calibrate against a brute-force reference, its streaming, its JSON, plots and command."""
import importlib
import json
import math

import pytest
import torch
from conftest import make_tiny_llama

from shortrt.calibration import Scores, calibrate, calibration_sequences
from shortrt.cli import main as cli_main
from shortrt.errors import ShortrtError

calibrate_module = importlib.import_module("shortrt.calibration")  # the module, not the function

NUM_LAYERS = 5
PROSE = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the families.",
    "The family of Dashwood had long been settled in Sussex. Their estate was large, and their "
    "residence was at Norland Park, in the centre of their property, where they had lived.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence; and had lived nearly twenty-one years.",
] * 4


def save_tiny_tokenizer(path, texts):
    """A byte-level BPE of 300 tokens trained on `texts`, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("calib") / "tiny", num_layers=NUM_LAYERS, vocab=320, seed=3)
    save_tiny_tokenizer(path, PROSE)
    return path


def brute_force_scores(model_dir, sequences):
    """Every statistic in fp64 from states computed layer by layer (each checked against transformers)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = hf.model.layers
    depth_states = [[] for _ in range(NUM_LAYERS + 1)]  # h_0 .. h_L, each [tokens, hidden]
    mids = [[] for _ in range(NUM_LAYERS)]
    with torch.no_grad():
        for seq in sequences:
            ids = seq[None]
            hidden_states = hf(ids, output_hidden_states=True).hidden_states
            h = hidden_states[0]
            positions = torch.arange(ids.shape[1])[None]
            rope = hf.model.rotary_emb(h, position_ids=positions)
            depth_states[0].append(h[0])
            for i, layer in enumerate(layers):
                attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                          attention_mask=None)
                mid = h + attn
                h = mid + layer.mlp(layer.post_attention_layernorm(mid))
                # transformers' last hidden state has the final norm applied; the others are raw.
                expected = hidden_states[i + 1] if i + 1 < NUM_LAYERS else None
                if expected is not None:
                    assert torch.allclose(h, expected, atol=1e-5)
                else:
                    assert torch.allclose(hf.model.norm(h), hidden_states[-1], atol=1e-5)
                mids[i].append(mid[0])
                depth_states[i + 1].append(h[0])
    h = [torch.cat(s).double() for s in depth_states]
    mid = [torch.cat(s).double() for s in mids]

    def cos(a, b):
        # The tiny tokenizer's <eos> is id 0, the padding index, whose embedding is zero: such a
        # row has cos 0 by shortrt's convention (documented in shortrt.kernels.cosine).
        norms = a.norm(dim=1) * b.norm(dim=1)
        return torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), 0.0).clamp(-1, 1)

    def angular(c):
        return (torch.arccos(c) / math.pi).mean().item()

    ref = {"bi": [], "angular": [], "attn_bi": [], "mlp_bi": []}
    for i in range(NUM_LAYERS):
        c = cos(h[i], h[i + 1])
        ref["bi"].append(1 - c.mean().item())
        ref["angular"].append(angular(c))
        ref["attn_bi"].append(1 - cos(h[i], mid[i]).mean().item())
        ref["mlp_bi"].append(1 - cos(mid[i], h[i + 1]).mean().item())
    ref["span_cos"] = [[cos(h[s], h[s + n]).mean().item() if s + n <= NUM_LAYERS else math.nan
                        for n in range(1, NUM_LAYERS + 1)] for s in range(NUM_LAYERS)]
    ref["span_angular"] = [[angular(cos(h[s], h[s + n])) if s + n <= NUM_LAYERS else math.nan
                            for n in range(1, NUM_LAYERS + 1)] for s in range(NUM_LAYERS)]
    return ref


def assert_lists_close(actual, expected, atol):
    flat_a = torch.tensor(actual, dtype=torch.float64).flatten()
    flat_e = torch.tensor(expected, dtype=torch.float64).flatten()
    assert torch.equal(flat_a.isnan(), flat_e.isnan())
    ok = ~flat_e.isnan()
    assert (flat_a[ok] - flat_e[ok]).abs().max().item() <= atol


def test_tokens_are_cut_into_sequences(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    first, second = (tok(t, add_special_tokens=False)["input_ids"] for t in PROSE[:2])
    stream = first + [tok.eos_token_id] + second
    sequences = calibration_sequences(tok, PROSE[:2], n_tokens=len(first) + 10, seq_len=16)
    assert torch.cat(sequences).tolist() == stream[:len(first) + 10]
    assert [len(s) for s in sequences[:-1]] == [16] * (len(sequences) - 1) and 1 <= len(sequences[-1]) <= 16
    # Asking for more tokens than the texts hold uses them all.
    assert torch.cat(calibration_sequences(tok, PROSE[:2], 10**6, 64)).tolist() == stream


def test_scores_match_brute_force_reference(tiny_model):
    from transformers import AutoTokenizer

    n_tokens, seq_len = 300, 64  # four full sequences and one of 44 tokens
    scores = calibrate(tiny_model, PROSE, n_tokens=n_tokens, seq_len=seq_len, batch_size=2, progress=False)
    sequences = calibration_sequences(AutoTokenizer.from_pretrained(tiny_model), PROSE, n_tokens, seq_len)
    ref = brute_force_scores(tiny_model, sequences)
    for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
        assert_lists_close(getattr(scores, name), ref[name], atol=1e-5)
    assert scores.num_layers == NUM_LAYERS and scores.max_span == NUM_LAYERS
    assert scores.data["n_tokens"] == 300 and scores.data["n_sequences"] == 5 and scores.data["seq_len"] == 64
    assert scores.data["source"] == f"{len(PROSE)} texts given by the caller"
    # The one-layer span is the layer itself.
    assert_lists_close([row[0] for row in scores.span_cos], [1 - b for b in scores.bi], atol=1e-12)


def test_streaming_batches_and_memory(tiny_model, monkeypatch):
    peaks, accumulators = [], []

    class RecordingHooks(calibrate_module.LayerStateHooks):
        def _post_hook(self, i):
            inner = super()._post_hook(i)

            def hook(module, args, output):
                inner(module, args, output)
                peaks.append(len(self.chain))
            return hook

    class RecordingAccumulator(calibrate_module.SimilarityAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accumulators.append(self)

    monkeypatch.setattr(calibrate_module, "LayerStateHooks", RecordingHooks)
    monkeypatch.setattr(calibrate_module, "SimilarityAccumulator", RecordingAccumulator)
    one = calibrate(tiny_model, PROSE, n_tokens=256, seq_len=32, batch_size=1, max_span=2, progress=False)
    four = calibrate(tiny_model, PROSE, n_tokens=256, seq_len=32, batch_size=4, max_span=2, progress=False)
    for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
        assert_lists_close(getattr(one, name), getattr(four, name), atol=1e-6)
    # After each layer only the last max_span depths of one batch are held, not all L + 1.
    assert max(peaks) == 2
    # The accumulator's size depends on layers and span only, not on the tokens seen.
    more = calibrate(tiny_model, PROSE, n_tokens=600, seq_len=32, batch_size=4, max_span=2, progress=False)
    expected = 3 * NUM_LAYERS * 2 + NUM_LAYERS * 2 * 2 + 3 * NUM_LAYERS + NUM_LAYERS * 2
    assert [acc.num_values() for acc in accumulators] == [expected] * 3
    assert more.data["n_tokens"] == 600


@pytest.mark.parametrize("state_bytes,groups", [(1 << 30, 1), (1, 3)])
def test_layer_streaming_gives_the_same_scores(tiny_model, state_bytes, groups, monkeypatch):
    """One decoder layer at a time over groups of tokens (stream=True) against the whole model
    with hooks; state_bytes=1 forces one group per batch, so each layer's weights are read 3 times."""
    from shortrt.streaming import LayerStream

    loads = []
    real_layer = LayerStream.layer

    def counting_layer(self, i):
        loads.append(i)
        return real_layer(self, i)

    monkeypatch.setattr(LayerStream, "layer", counting_layer)
    kwargs = dict(n_tokens=300, seq_len=64, batch_size=2, max_span=3, progress=False)
    whole = calibrate(tiny_model, PROSE, stream=False, **kwargs)
    streamed = calibrate(tiny_model, PROSE, stream=True, state_bytes=state_bytes, **kwargs)
    for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
        assert_lists_close(getattr(streamed, name), getattr(whole, name), atol=1e-6)
    assert streamed.data["streamed"] is True and whole.data["streamed"] is False
    assert loads == list(range(NUM_LAYERS)) * groups  # 300 tokens in batches of 2 x 64: 3 batches


def test_layer_stream_reads_only_what_it_needs(tiny_model):
    from shortrt.checkpoint import load
    from shortrt.streaming import LayerStream

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    stream = LayerStream(load(tiny_model))
    ids = torch.tensor([[5, 17, 300, 2]])
    assert torch.equal(stream.embed(ids), hf.model.embed_tokens(ids).detach())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 320\)"):
        stream.embed(torch.tensor([[320]]))
    with stream.layer(2) as layer:
        assert torch.equal(layer.mlp.down_proj.weight, hf.model.layers[2].mlp.down_proj.weight)
    assert layer.mlp.down_proj.weight.is_meta  # freed when the block ends
    with pytest.raises(ValueError, match="layer 5 out of range"):
        with stream.layer(NUM_LAYERS):
            pass


@pytest.mark.slow
def test_default_model_streaming_matches(default_model):
    """The same scores from layer streaming as from the whole model, on the real model."""
    kwargs = dict(n_tokens=1024, seq_len=256, max_span=6, progress=False)
    whole = calibrate(default_model, stream=False, **kwargs)
    streamed = calibrate(default_model, stream=True, **kwargs)
    for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
        assert_lists_close(getattr(streamed, name), getattr(whole, name), atol=2e-5)


def test_max_span_limits_the_table(tiny_model):
    full = calibrate(tiny_model, PROSE, n_tokens=128, seq_len=64, progress=False)
    short = calibrate(tiny_model, PROSE, n_tokens=128, seq_len=64, max_span=2, progress=False)
    assert short.max_span == 2 and all(len(row) == 2 for row in short.span_cos)
    assert_lists_close(short.span_cos, [row[:2] for row in full.span_cos], atol=1e-9)
    assert math.isnan(short.span_cos[NUM_LAYERS - 1][1])  # start 4 + 2 layers > 5
    assert_lists_close(short.bi, full.bi, atol=1e-9)


def test_triton_backend_gives_the_same_scores(tiny_model):
    pytest.importorskip("triton")
    kwargs = dict(n_tokens=128, seq_len=64, batch_size=2, progress=False)
    reference = calibrate(tiny_model, PROSE, backend="torch", **kwargs)
    triton = calibrate(tiny_model, PROSE, backend="triton", **kwargs)
    for name in ("bi", "angular", "attn_bi", "mlp_bi", "span_cos", "span_angular"):
        assert_lists_close(getattr(triton, name), getattr(reference, name), atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"n_tokens": 0}, ValueError, "n_tokens must be a positive integer"),
    ({"seq_len": 1000}, ValueError, "max_position_embeddings 256"),
    ({"max_span": NUM_LAYERS + 1}, ValueError, "exceeds the model's 5 layers"),
    ({"batch_size": -1}, ValueError, "batch_size"),
    ({"backend": "gpu"}, ValueError, "unknown cosine backend"),
    ({"stream": True, "state_bytes": 0}, ValueError, "state_bytes must be a positive integer"),
])
def test_bad_arguments_are_named(tiny_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        calibrate(tiny_model, PROSE, progress=False, **kwargs)


def test_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        calibrate(tmp_path / "no-such-model", PROSE, progress=False)


def test_json_round_trip(tiny_model, tmp_path):
    scores = calibrate(tiny_model, PROSE, n_tokens=64, seq_len=32, progress=False)
    path = tmp_path / "scores.json"
    scores.save(path)
    raw = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert raw["format"] == "shortrt.scores/1" and raw["span_cos"][NUM_LAYERS - 1][1] is None
    loaded = Scores.load(path)
    assert loaded.to_json() == scores.to_json()
    assert math.isnan(loaded.span_angular[NUM_LAYERS - 1][1]) and loaded.bi == scores.bi

    raw["format"] = "something/else"
    path.write_text(json.dumps(raw))
    with pytest.raises(ShortrtError, match="not a shortrt scores file"):
        Scores.load(path)
    raw["format"] = "shortrt.scores/1"
    raw["bi"] = raw["bi"][:-1]
    path.write_text(json.dumps(raw))
    with pytest.raises(ShortrtError, match="'bi' has 4 entries for 5 layers"):
        Scores.load(path)
    with pytest.raises(FileNotFoundError):
        Scores.load(tmp_path / "absent.json")


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_plots_are_written(tiny_model, tmp_path):
    from shortrt.plots import plot_layer_scores, plot_similarity_heatmap

    scores = calibrate(tiny_model, PROSE, n_tokens=64, seq_len=32, progress=False)
    bars, heatmap = tmp_path / "layers.png", tmp_path / "heatmap.png"
    assert plot_layer_scores(scores, bars) == bars
    assert plot_similarity_heatmap(scores, heatmap) == heatmap
    for path in (bars, heatmap):
        width, height = png_size(path)
        assert width >= 600 and height >= 500


def test_command_writes_json_plots_and_table(tiny_model, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(PROSE))
    out = tmp_path / "run" / "scores.json"
    argv = ["calibrate", str(tiny_model), "--out", str(out), "--data", str(text), "--tokens", "200",
            "--seq-len", "64", "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    scores = Scores.load(out)
    assert scores.data["n_tokens"] == 200 and str(text) in scores.data["source"]
    layers_png, heatmap_png = out.parent / "scores_layers.png", out.parent / "scores_heatmap.png"
    png_size(layers_png), png_size(heatmap_png)
    table = [line for line in printed.splitlines() if line.strip()[:1].isdigit() and "tokens" not in line]
    assert printed.count("layer      BI  angular  attn BI   mlp BI") == 1 and len(table) == NUM_LAYERS
    assert f"{scores.bi[3]:.4f}" in table[3] and str(layers_png) in printed and str(heatmap_png) in printed

    assert cli_main(argv) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    plots = tmp_path / "plots"
    assert cli_main(argv + ["--force", "--plots", str(plots)]) == 0
    png_size(plots / "scores_layers.png"), png_size(plots / "scores_heatmap.png")

    streamed = tmp_path / "streamed.json"
    argv[argv.index(str(out))] = str(streamed)
    assert cli_main(argv + ["--stream", "--state-memory", "100k"]) == 0
    assert "(layer streaming)" in capsys.readouterr().out
    assert_lists_close(Scores.load(streamed).bi, scores.bi, atol=1e-6)
    with pytest.raises(SystemExit):
        cli_main(argv + ["--stream", "--no-stream"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_layer_profile(default_model):
    """The real model on 1024 tokens of Austen: the first layer rewrites the embedding (BI near 1),
    middle layers barely change the state, and every score lies in (0, 1)."""
    scores = calibrate(default_model, n_tokens=1024, seq_len=256, max_span=4, progress=False)
    assert scores.num_layers == 30 and scores.data["n_tokens"] == 1024
    assert "Pride and Prejudice" in scores.data["source"]
    assert scores.bi[0] == max(scores.bi) and scores.bi[0] > 0.9
    assert sorted(scores.bi)[15] < 0.1
    for name in ("bi", "attn_bi", "mlp_bi", "angular"):
        assert all(0.0 < v < 1.0 for v in getattr(scores, name)), name
