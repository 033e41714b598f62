"""Evaluation (shortrt.evaluate): packed scoring equals plain transformers, metrics, tasks, masking."""
import importlib
import math

import pytest
import torch

import shortrt
from conftest import make_tiny_llama
from shortrt.eval_packing import Segment, pack
from shortrt.eval_tasks import Question, sample_task
from shortrt.layer_plan import Step, dense_plan, forward_plans, load_for_plan, plan_logits
from shortrt.layermap import LayerMap
from shortrt.pruning import prune

# The module, not the function shortrt.evaluate that the package exports under the same name.
ev = importlib.import_module("shortrt.evaluation")

VOCAB = 320
PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife. However little known the feelings or views of such a man may be "
         "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
         "surrounding families, that he is considered the rightful property of some one or other of "
         "their daughters. ") * 3


def save_tokenizer(path):
    """A byte-level BPE trained on PROSE, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROSE], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(path)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    path = make_tiny_llama(tmp_path / "tiny", num_layers=5, vocab=VOCAB, seed=7)
    save_tokenizer(path)
    # Held-out prose for ppl: two short documents instead of the Austen novel.
    import shortrt.data

    monkeypatch.setattr(shortrt.data, "heldout_texts", lambda name="persuasion": [PROSE, PROSE[::-1]])
    return shortrt.load(path)


def hf_logprob(hf, context, continuation):
    """log p(continuation | context) from one plain transformers forward pass."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + t, tok]) for t, tok in enumerate(continuation))


def test_packed_segments_score_like_separate_sequences(tiny):
    hf = tiny.load_hf()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    segments = [Segment(rand(7), [rand(3), rand(1), rand(5)]), Segment(rand(2), [rand(4), rand(2)]),
                Segment(rand(12), score_context_from=4), Segment(rand(9), [rand(6)])]
    batches = pack(segments, row_tokens=24, batch_tokens=48)
    assert len(batches) >= 2 and all(b.input_ids.shape[1] <= 24 for b in batches)
    got = {}
    for b in batches:
        (h,) = forward_plans(hf, b.input_ids, b.position_ids, b.mask, [dense_plan(5)])
        logp = ev._token_logprobs(hf, h[b.rows, b.cols], b.targets)
        for s, br, lp in zip(b.segment.tolist(), b.branch.tolist(), logp.tolist()):
            got[s, br] = got.get((s, br), 0.0) + lp
    for s, seg in enumerate(segments):
        for k, branch in enumerate(seg.branches):
            assert got[s, k] == pytest.approx(hf_logprob(hf, seg.context, branch), abs=1e-4)
    ctx = segments[2].context
    assert got[2, -1] == pytest.approx(hf_logprob(hf, ctx[:4], ctx[4:]), abs=1e-4)


def test_plan_forward_matches_transformers_and_shares_prefixes(tiny):
    hf = tiny.load_hf()
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (plan_logits(hf, ids, dense_plan(5)) - ref).abs().max().item() <= 1e-5
    plans = [dense_plan(5), (Step(0), Step(1), Step(3), Step(4)), (Step(0), Step(1, attention=False), Step(2))]
    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(2, 1, T, T)
    pos = torch.arange(T).repeat(2, 1)
    together = forward_plans(hf, ids, pos, mask, plans)
    for plan, h in zip(plans, together):
        (alone,) = forward_plans(hf, ids, pos, mask, [plan])
        assert torch.equal(h, alone)


def test_ppl_equals_a_direct_strided_computation(tiny):
    hf = tiny.load_hf()
    tok = tiny.tokenizer()
    result = ev.evaluate(tiny, "ppl", n_tokens=150, seq_len=64, stride=40, progress=False)["tasks"]["ppl"]
    # Reference: the same windows scored by plain transformers, one window at a time.
    docs = [tok(PROSE, add_special_tokens=False)["input_ids"], tok(PROSE[::-1], add_special_tokens=False)["input_ids"]]
    budget, total, count = 150, 0.0, 0
    for ids in docs:
        ids = ids[:budget + 1]
        budget -= len(ids) - 1
        prev_end = 0
        for begin in range(0, len(ids), 40):
            end = min(begin + 64, len(ids))
            start = max(1, prev_end - begin)
            window = ids[begin:end]
            total += hf_logprob(hf, window[:start], window[start:])
            count += len(window) - start
            prev_end = end
            if end == len(ids):
                break
        if budget <= 0:
            break
    assert result["tokens"] == count == 150
    assert result["ppl"] == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_multiple_choice_accuracy_matches_direct_scoring(tiny):
    hf = tiny.load_hf()
    tok = tiny.tokenizer()
    result = ev.evaluate(tiny, ["arc_easy", "piqa"], n_samples=6, seed=3, progress=False)
    for task in ("arc_easy", "piqa"):
        questions = sample_task(task, 6, seed=3)
        correct = correct_norm = 0
        for q in questions:
            ctx = tok(q.context, add_special_tokens=False)["input_ids"]
            ll = [hf_logprob(hf, ctx, tok(c, add_special_tokens=False)["input_ids"]) for c in q.choices]
            norm = [x / len(c.encode()) for x, c in zip(ll, q.choices)]
            correct += max(range(len(ll)), key=lambda i: (ll[i], -i)) == q.gold
            correct_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == q.gold
        m = result["tasks"][task]
        assert m["n"] == 6
        assert m["acc"] == pytest.approx(correct / 6) and m["acc_norm"] == pytest.approx(correct_norm / 6)
        assert m["acc_se"] == pytest.approx(math.sqrt(m["acc"] * (1 - m["acc"]) / 6))


def test_accuracy_and_length_normalisation():
    questions = [Question("q", (" a", " bbbbbbb"), 1), Question("q", (" a", " b"), 0)]
    total = torch.tensor([[0.0, -2.0, -7.0], [0.0, -1.0, -3.0]], dtype=torch.float64)
    m = ev._mc_metrics(total, questions, [0, 1])
    # Q1: the sum prefers the short wrong choice, the per-byte score the long right one.
    assert m["acc"] == 0.5 and m["acc_norm"] == 1.0
    assert m["acc_se"] == pytest.approx(0.3535534, rel=1e-6) and m["acc_norm_se"] == 0.0


def test_task_samples_are_fixed_by_seed():
    a = sample_task("arc_challenge", 20, seed=0)
    assert a == sample_task("arc_challenge", 20, seed=0)
    assert a != sample_task("arc_challenge", 20, seed=1)
    assert len(a) == 20 and all(0 <= q.gold < len(q.choices) for q in a)
    for task, n_choices in (("arc_easy", None), ("hellaswag", 4), ("piqa", 2), ("mmlu", 4)):
        qs = sample_task(task, 5, seed=0)
        assert len(qs) == 5 and all(c.startswith(" ") for q in qs for c in q.choices)
        assert n_choices is None or all(len(q.choices) == n_choices for q in qs)
    assert "[header]" not in " ".join(q.context for q in sample_task("hellaswag", 200, seed=0))
    assert len(sample_task("arc_challenge", 10_000)) == 299  # all of the validation split


@pytest.mark.parametrize("kwargs, message", [
    (dict(tasks="ppl,squad"), "unknown task\\(s\\) \\['squad'\\]"),
    (dict(tasks=""), "no tasks given"),
    (dict(tasks="ppl", n_samples=0), "n_samples must be a positive integer"),
    (dict(tasks="ppl", stride=600), "stride \\(600\\) cannot exceed seq_len \\(512\\)"),
    (dict(tasks="ppl", engine="vllm"), "unknown evaluation engine 'vllm'"),
])
def test_bad_arguments_are_clear_errors(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ev.evaluate(tiny, progress=False, **kwargs)


def test_masked_layer_maps_equal_their_pruned_checkpoints(tiny, tmp_path):
    maps = {"dense": None, "drop": LayerMap.from_removed(5, [1, 3]),
            "attn": LayerMap.from_removed_attention(5, [0, 2])}
    settings = dict(tasks="ppl,piqa", n_tokens=100, seq_len=48, stride=32, n_samples=4, progress=False)
    many = ev.evaluate_layer_maps(tiny, maps, **settings)
    assert many["drop"]["layers"] == 3 and many["attn"]["attention_layers"] == 3
    assert many["dense"]["tasks"]["ppl"]["ppl"] != many["drop"]["tasks"]["ppl"]["ppl"]
    for name in ("drop", "attn"):
        ckpt = prune(tiny, maps[name], tmp_path / name)
        alone = ev.evaluate(ckpt, **settings)
        assert alone["tasks"]["ppl"]["ppl"] == pytest.approx(many[name]["tasks"]["ppl"]["ppl"], rel=1e-6)
        assert alone["tasks"]["piqa"]["acc"] == many[name]["tasks"]["piqa"]["acc"]
        assert alone["layers"] == many[name]["layers"]
    # A layer map applied to a pruned checkpoint indexes that checkpoint's layers.
    drop = prune(tiny, maps["drop"], tmp_path / "drop2")
    hf, plan = load_for_plan(drop)
    assert [s.index for s in plan] == [0, 1, 2]
    assert ev.apply_layer_map(plan, LayerMap.from_removed(3, [1])) == (Step(0), Step(2))


def test_eval_command_prints_a_table_and_writes_json(tiny, tmp_path, capsys):
    import json

    from shortrt.cli import main

    path = tmp_path / "r.json"
    code = main(["eval", str(tiny.path), "--tasks", "ppl", "--tokens", "64", "--seq-len", "32", "--stride", "16",
                 "--skip-layers", "2", "--json", str(path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["layers"] == 4 and saved["skipped_layers"] == [2] and saved["tasks"]["ppl"]["tokens"] == 64
    assert f"ppl {saved['tasks']['ppl']['ppl']:.3f}" in printed
    assert main(["eval", str(tiny.path), "--tasks", "ppl,bogus"]) == 1
    assert "unknown task(s) ['bogus']" in capsys.readouterr().err


def test_ppl_on_the_users_text_and_on_sciq(tiny, tmp_path, monkeypatch, capsys):
    """--data replaces Persuasion for ppl (files or a directory); ppl_sciq scores the science set."""
    import json

    import shortrt.data
    from shortrt.cli import main

    own = tmp_path / "own"
    own.mkdir()
    (own / "a.txt").write_text(PROSE[::-1])
    (own / "b.jsonl").write_text(json.dumps({"text": PROSE}) + "\n")
    swapped = ev.evaluate(tiny, "ppl", n_tokens=150, seq_len=64, stride=40, progress=False)["tasks"]["ppl"]
    mine = ev.evaluate(tiny, "ppl", n_tokens=150, seq_len=64, stride=40, progress=False,
                       ppl_data=own)["tasks"]["ppl"]
    # The directory's files in name order: PROSE[::-1], then PROSE -- the held-out pair swapped.
    monkeypatch.setattr(shortrt.data, "heldout_texts", lambda name="persuasion": [PROSE[::-1], PROSE])
    reordered = ev.evaluate(tiny, "ppl", n_tokens=150, seq_len=64, stride=40, progress=False)["tasks"]["ppl"]
    assert mine["ppl"] == pytest.approx(reordered["ppl"], rel=1e-9) and mine["tokens"] == 150
    assert mine["ppl"] != pytest.approx(swapped["ppl"], rel=1e-6)
    assert mine["data"] == "2 files (a.txt, b.jsonl; 2 texts)" and "Persuasion" in swapped["data"]

    monkeypatch.setattr(shortrt.data, "heldout_texts",
                        lambda name="persuasion": {"persuasion": [PROSE], "sciq": [PROSE[::-1]]}[name])
    both = ev.evaluate(tiny, "ppl,ppl_sciq", n_tokens=100, seq_len=64, stride=40, progress=False)["tasks"]
    alone = ev.evaluate(tiny, "ppl", n_tokens=100, seq_len=64, stride=40, progress=False, ppl_data=[PROSE[::-1]])
    assert both["ppl_sciq"]["ppl"] == pytest.approx(alone["tasks"]["ppl"]["ppl"], rel=1e-9)
    assert "SciQ" in both["ppl_sciq"]["data"]

    out = tmp_path / "r.json"
    assert main(["eval", str(tiny.path), "--tasks", "ppl", "--data", str(own / "a.txt"), str(own / "b.jsonl"),
                 "--tokens", "150", "--seq-len", "64", "--stride", "40", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["tasks"]["ppl"]["ppl"] == pytest.approx(mine["ppl"], rel=1e-9)
    capsys.readouterr()
    assert main(["eval", str(tiny.path), "--tasks", "arc_easy", "--data", str(own)]) == 1
    assert "--data sets the text the ppl task scores: add ppl to --tasks" in capsys.readouterr().err
    assert main(["eval", str(tiny.path), "--tasks", "ppl", "--data", str(tmp_path / "gone.txt")]) == 1
    assert "data file not found" in capsys.readouterr().err


def test_runtime_perplexity_equals_evaluate_on_the_same_windows(tiny):
    # The C++ engine in fp32 scores evaluate's strided windows like transformers does (the
    # runtime's logits are within 1e-4 of transformers', tests/test_runtime_logits.py).
    from shortrt.engine import Engine

    want = ev.evaluate(tiny, "ppl", n_tokens=150, seq_len=64, stride=40, progress=False)["tasks"]["ppl"]
    got = ev.runtime_perplexity(Engine(tiny, threads=1, max_seq=64), n_tokens=150, seq_len=64, stride=40)
    assert got["tokens"] == want["tokens"] == 150
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
    int8 = ev.runtime_perplexity(Engine(tiny, dtype="int8", threads=1, max_seq=64), n_tokens=150, seq_len=64,
                                 stride=40)
    assert int8["ppl"] != got["ppl"] and int8["ppl"] == pytest.approx(want["ppl"], rel=0.1)
