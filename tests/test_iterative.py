"""Iterative pruning (shortrt.iterative_select, `shortrt prune --method iterative`): each round's
scores are those of the pruned model, the first round is shortgpt's, and the checkpoint it makes
is valid everywhere.

The tiny 6-layer model has the output projections of layers 1, 3 and 4 scaled down, so that the
removal order is not simply front to back and the kept prefix state is used, kept and dropped.
Tolerance: a round's score against `calibrate` of a written pruned checkpoint (transformers'
own forward with hooks, not the plan) within 1e-5.
"""
import pytest
import torch

import shortrt
from conftest import read_meta, run_cli
from runtime_models import make_tiny, rel_err
from shortrt.calibration import calibrate
from shortrt.engine import Engine
from shortrt.iterative import iterative_select
from shortrt.layer_plan import load_for_plan, plan_logits
from shortrt.layermap import LayerMap
from shortrt.selection import select

TOL = 1e-5
TEXTS = ["Once upon a time there was a little model that ran on a lean runtime. " * 3,
         "The quick brown fox jumps over the lazy dog, and then the dog ran after the fox. " * 3] * 6
FAST = dict(texts=TEXTS, n_tokens=512, seq_len=64, progress=False)
CALIB = dict(n_tokens=512, seq_len=64, max_span=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, model = make_tiny(tmp_path_factory.mktemp("iterative") / "dense", num_hidden_layers=6, tokenizer=True)
    with torch.no_grad():
        for i, factor in {1: 0.6, 3: 0.3, 4: 0.5}.items():
            model.model.layers[i].self_attn.o_proj.weight.mul_(factor)
            model.model.layers[i].mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def five(tiny):
    return iterative_select(tiny, remove=5, **FAST)


def test_remove_one_is_shortgpt(tiny):
    lmap = iterative_select(tiny, remove=1, **FAST)
    scores = calibrate(tiny, TEXTS, **CALIB)
    assert lmap.removed == select(scores, remove=1, method="shortgpt").removed == lmap.scores["order"]
    assert lmap.method == "iterative" and lmap.retained == [i for i in range(6) if i not in lmap.removed]
    assert lmap.scores["bi"] == pytest.approx(scores.bi, abs=TOL)
    assert lmap.scores["angular"] == pytest.approx(scores.angular, abs=TOL)
    assert lmap.scores["order_scores"] == [pytest.approx(min(scores.bi), abs=TOL)]


def test_each_round_scores_the_pruned_model(tiny, five, tmp_path):
    """Round r's scores equal calibrate() of the checkpoint with the first r-1 removed layers gone."""
    order, rounds = five.scores["order"], five.scores["rounds"]
    assert sorted(order) == five.removed and len(set(order)) == 5 and len(rounds) == 5
    assert order[:4] != sorted(order[:4])  # not front to back: later layers' inputs really changed
    for r, layer in enumerate(order):
        gone = order[:r]
        model = tiny if not gone else shortrt.prune(tiny, LayerMap.from_removed(6, gone), tmp_path / f"r{r}")
        kept = [i for i in range(6) if i not in gone]
        bi = calibrate(model, TEXTS, **CALIB).bi
        assert [rounds[r][i] for i in kept] == pytest.approx(bi, abs=TOL), f"round {r + 1}"
        assert all(rounds[r][i] is None for i in gone)
        assert layer == kept[min(range(len(kept)), key=lambda j: bi[j])]
        assert five.scores["order_scores"][r] == pytest.approx(bi[kept.index(layer)], abs=TOL)


def test_prefix_reuse_changes_no_score(tiny, five):
    runs = five.calibration["round_layers_run"]
    assert runs[0] == 6 and any(run < 6 - r for r, run in enumerate(runs)), runs  # some round started late
    again = iterative_select(tiny, remove=5, reuse_prefix=False, **FAST)
    assert again.calibration["round_layers_run"] == [6, 5, 4, 3, 2]
    assert again.scores["rounds"] == five.scores["rounds"] and again.removed == five.removed


def test_angular_metric(tiny):
    lmap = iterative_select(tiny, remove=1, metric="angular", **FAST)
    angular = calibrate(tiny, TEXTS, **CALIB).angular
    assert lmap.scores["metric"] == "angular"
    assert lmap.removed == [min(range(6), key=lambda i: angular[i])]
    assert lmap.scores["order_scores"][0] == pytest.approx(min(angular), abs=TOL)


def test_checkpoint_is_valid_everywhere(tiny, tmp_path):
    lmap = iterative_select(tiny, remove=3, **FAST)
    out = shortrt.prune(tiny, lmap, tmp_path / "p3")
    out.check()
    meta = read_meta(out)
    assert meta["method"] == "iterative" and meta["removed"] == sorted(meta["scores"]["order"])
    assert meta["scores"]["metric"] == "bi" and len(meta["scores"]["order_scores"]) == 3
    assert meta["calibration"]["rounds"] == 3 and meta["calibration"]["n_tokens"] == 512
    assert shortrt.load(out).layer_map.scores == lmap.scores
    ids = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5]
    hf, plan = load_for_plan(tiny, skip_layers=lmap.removed)
    expected = plan_logits(hf, torch.tensor([ids]), plan)[0].numpy()
    eng = Engine(out, dtype="fp32", threads=1)  # the C++ reader of shortrt.json
    assert eng.num_layers == 3
    assert rel_err(eng.logits(ids), expected) < 1e-4


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="cannot remove 6 of 6 layers"):
        iterative_select(tiny, remove=6, **FAST)
    with pytest.raises(ValueError, match="exactly one of remove"):
        iterative_select(tiny, remove=2, ratio=0.5, **FAST)
    with pytest.raises(ValueError, match="unknown metric 'cos'"):
        iterative_select(tiny, remove=2, metric="cos", **FAST)
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        iterative_select(tiny, remove=2, texts=TEXTS, n_tokens=0)
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="data file not found"):
        iterative_select(tiny, remove=2, texts=missing, progress=False)
    with pytest.raises(ValueError, match="use shortrt.iterative_select"):
        select({"bi": [0.1] * 6}, remove=2, method="iterative")
    assert iterative_select(tiny, remove=0, **FAST).removed == []



def test_cli_prunes_iteratively(tiny, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(TEXTS))
    rc, out, err = run_cli(["prune", tiny, "--method", "iterative", "--ratio", "0.34", "--data", data,
                            "--tokens", 512, "--metric", "angular", "--out", tmp_path / "p2"], capsys)
    assert rc == 0, err
    meta = read_meta(tmp_path / "p2")
    assert meta["method"] == "iterative" and meta["scores"]["metric"] == "angular"
    assert meta["calibration"]["source"].startswith(f"file {data}")
    assert len(meta["removed"]) == 2 and "round 2/2" in err
    first, second = meta["scores"]["order"]
    assert f"angular     in the order removed: {first}: " in out and f", {second}: " in out


@pytest.mark.parametrize("args,rc,phrase", [
    (["--remove", "6"], 1, "cannot remove 6 of 6 layers"),
    (["--remove", "2", "--data", "{missing}"], 1, "data file not found"),
    (["--remove", "2", "--scores", "{missing}"], 1, "--method iterative measures the scores itself"),
    (["--remove", "2", "--metric", "cos"], 2, "argument --metric: invalid choice: 'cos'"),
    (["--remove", "2", "--tokens", "0"], 2, "argument --tokens: must be between 1 and"),
    ([], 2, "one of the arguments --remove --ratio"),
])
def test_cli_errors_are_one_line(tiny, tmp_path, capsys, args, rc, phrase):
    argv = ["prune", tiny, "--method", "iterative", "--out", tmp_path / "out"]
    got, _, err = run_cli(argv + [a.format(missing=tmp_path / "missing.txt") for a in args], capsys)
    assert got == rc and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_iterative_options_need_the_method(tiny, tmp_path, capsys):
    rc, _, err = run_cli(["prune", tiny, "--method", "last", "--remove", "1", "--tokens", "100",
                          "--out", tmp_path / "out"], capsys)
    assert rc == 1 and "--tokens: only for --method iterative" in err and err.count("\n") == 1


def test_benchmark_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import shortrt.data

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import iterative as bench

    path, _ = make_tiny(tmp_path / "m", num_hidden_layers=5, tokenizer=True, max_position_embeddings=1024)
    monkeypatch.setattr(shortrt.data, "calibration_texts", lambda source: (TEXTS, "test prose"))
    monkeypatch.setattr(shortrt.data, "heldout_texts", lambda *a, **k: TEXTS[:2])
    result = bench.main(["--model", str(path), "--removed", "1,2", "--tokens", "256", "--ppl-tokens", "128",
                         "--recompute", "2", "--repeats", "2", "--json", str(tmp_path / "r.json")])
    names = [r["name"] for r in result["rows"]]
    assert names == ["dense", "shortgpt-1", "iterative-1", "shortgpt-2", "iterative-2"]
    assert result["rows"][2]["order"] == result["order"][:1]
    assert result["timing"]["rounds"] == 2 and len(result["timing"]["reuse"]) == len(result["timing"]["recompute"]) == 2
    assert (tmp_path / "r.json").exists() and "| iterative-2 |" in capsys.readouterr().out
