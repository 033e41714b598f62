"""Budget-driven pruning (shortrt.budget, shortrt.costs, `shortrt prune --target-speedup/--max-*-bytes`):
the count chosen from a cost table, exact byte figures, the cost cache, and the command line.
No timing is asserted: times are machine- and load-dependent (benchmarks and printouts show them)."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
from conftest import run_cli

from runtime_models import make_tiny, write_pruned
from shortrt import costs as costs_mod
from shortrt.budget import Budget, BudgetError, count_for_budget, layers_for_budget
from shortrt.checkpoint import load, rewrite_layer_map
from shortrt.commands import size
from shortrt.costs import Costs, Linear, kv_table, measure_costs, weight_table
from shortrt.engine import Engine
from shortrt.layermap import LayerMap

FULL = [(True, True)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("budget") / "m", num_hidden_layers=6, tokenizer=True)[0]



# ----------------------------------------------------------------------------- the count, from a table

@pytest.mark.parametrize("kind,value,attention,expected", [
    # dense step 1 + 30 * 0.15 = 5.5; removing k layers leaves 1 + (30 - k) * 0.15
    ("speedup", 1.3, False, (9, 5.5 / 4.15)),
    ("speedup", 2.0, False, (19, 5.5 / 2.65)),
    ("speedup", 1.01, False, (1, 5.5 / 5.35)),
    # removing k attentions leaves 1 + 30 * 0.1 + (30 - k) * 0.05
    ("speedup", 1.2, True, (19, 5.5 / 4.55)),
])
def test_count_for_a_speedup_from_a_cost_table(kind, value, attention, expected):
    count, figure = count_for_budget(Budget(kind, value), Linear(1.0, 0.05, 0.1), FULL * 30, attention=attention)
    assert count == expected[0]
    assert figure == pytest.approx(expected[1])


@pytest.mark.parametrize("kind,limit,attention,expected", [
    ("weight_bytes", 3000, False, (5, 3000)),   # 1000 + 400 * 5: exactly at the limit meets it
    ("weight_bytes", 2999, False, (6, 2600)),
    ("weight_bytes", 5000, False, (0, 5000)),   # the model already fits: nothing to remove
    ("weight_bytes", 4500, True, (5, 4500)),    # attentions only: 1000 + 3000 + 100 * n
    ("kv_bytes", 128, True, (8, 128)),           # 64 bytes per attention
    ("kv_bytes", 128, False, (8, 128)),
])
def test_count_for_a_byte_limit_from_a_table(kind, limit, attention, expected):
    table = Linear(0, 64, 0) if kind == "kv_bytes" else Linear(1000, 100, 300)
    assert count_for_budget(Budget(kind, limit), table, FULL * 10, attention=attention) == expected


def test_layers_that_differ_need_the_method_s_choice():
    layers = [(True, True), (False, True), (True, True), (True, True)]
    table = Linear(0, 10, 1)
    with pytest.raises(ValueError, match="give removed_for"):
        count_for_budget(Budget("kv_bytes", 20), table, layers)
    # dense: 3 attentions and 4 MLPs = 34; the method removes layer 1 (no attention) first
    order = [1, 0, 2, 3]
    assert count_for_budget(Budget("weight_bytes", 33), table, layers, removed_for=lambda k: order[:k]) == (1, 33)
    assert count_for_budget(Budget("weight_bytes", 30), table, layers, removed_for=lambda k: order[:k]) == (2, 22)
    # removing layer 1 saves no KV (it has no attention); removing layer 0 too does
    kv = Linear(0, 10, 0)
    assert count_for_budget(Budget("kv_bytes", 25), kv, layers, removed_for=lambda k: order[:k]) == (2, 20)


def test_an_unreachable_budget_names_itself_and_the_best_figure():
    with pytest.raises(BudgetError) as exc:
        count_for_budget(Budget("speedup", 1.4), Linear(1.0, 0.05, 0.1), FULL * 30, attention=True)
    msg = str(exc.value)
    assert msg.startswith("--target-speedup 1.4 cannot be met (int8, ")
    assert f"the best reachable is {5.5 / 4.05:.3f}x, with 29 of 30 attention sublayers removed" in msg
    with pytest.raises(BudgetError, match=r"--max-weight-bytes 1,000 bytes cannot be met \(int8\): the best "
                                          r"reachable is 1,400 bytes, with 9 of 10 layers removed"):
        count_for_budget(Budget("weight_bytes", 1000), Linear(1000, 100, 300), FULL * 10)


@pytest.mark.parametrize("args,phrase", [
    (dict(kind="speedup", value=1.0), "must be above 1"),
    (dict(kind="speedup", value=math.nan), "finite number"),
    (dict(kind="weight_bytes", value=1.5), "whole number of bytes"),
    (dict(kind="bytes", value=10), "unknown budget kind"),
    (dict(kind="kv_bytes", value=10, max_batch=0), "max_batch"),
    (dict(kind="speedup", value=2, dtype="fp16"), "unknown dtype"),
])
def test_bad_budgets(args, phrase):
    with pytest.raises(ValueError, match=phrase):
        Budget(**args)


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("text,value", [
    ("12345", 12345), ("100M", 100 * 10**6), ("1.5G", 1_500_000_000), ("200MiB", 200 * 2**20), ("2kb", 2000),
    ("1KiB", 1024), ("1.5Gi", 3 * 2**29), ("0.5k", 500), ("1e3", 1000), ("100 MB", 10**8), ("3t", 3 * 10**12),
])
def test_sizes(text, value):
    assert size(text) == value


@pytest.mark.parametrize("text,phrase", [
    ("abc", "expected a size like 100M, 1.5G, 200MiB or a number of bytes, got 'abc'"),
    ("12X", "expected a size like"), ("-5M", "expected a size like"), ("MiB", "expected a size like"),
    ("nan", "expected a size like"), ("1e9999", "expected a size like"),
    ("1.5", "'1.5' is not a whole number of bytes"), ("0.1k", None), ("0", "must be between 1 byte and 2**62"),
    ("1e30", "must be between 1 byte and 2**62"),
])
def test_size_errors(text, phrase):
    if phrase is None:  # 0.1k = 100 bytes: fine
        assert size(text) == 100
        return
    with pytest.raises(argparse.ArgumentTypeError, match=phrase.replace("(", r"\(").replace("*", r"\*")):
        size(text)


# ----------------------------------------------------------------------------- exact bytes

@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", False),
                                      ("olmo2", False), ("phi3", True)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_weight_and_kv_tables_equal_the_engine(tmp_path, arch, tie, dtype):
    path = make_tiny(tmp_path / "m", arch=arch, tie_word_embeddings=tie)[0]
    sub = write_pruned(path, tmp_path / "sub", [0, 1, 3], flags={1: (False, True)})
    table, kv = weight_table(path, dtype), kv_table(path, max_seq=40, max_batch=3)
    for model, skip, n_attention, n_mlp in [(path, [], 4, 4), (path, [1, 2], 2, 2), (sub, [], 2, 3), (sub, [0], 1, 2)]:
        eng = Engine(model, dtype=dtype, threads=1, max_seq=40, max_batch=3, skip_layers=skip)
        assert eng.weight_bytes == table.at(n_attention, n_mlp)
        assert eng.kv_cache_bytes == kv.at(n_attention, n_mlp)
    assert kv_table(path).at(4, 4) == Engine(path, threads=1).kv_cache_bytes  # the default context


def _read_budget(path) -> dict:
    return json.loads((path / "shortrt.json").read_text())["budget"]


def test_weight_budget_on_the_command_line_is_exact(tiny, tmp_path, capsys):
    table = weight_table(tiny, "bf16")
    limit = int(table.at(3, 3)) + 1  # three layers fit (with a byte to spare), four do not
    out = tmp_path / "w"
    rc, stdout, err = run_cli(["prune", tiny, "--method", "last", "--max-weight-bytes", str(limit), "--dtype", "bf16",
                               "--out", out], capsys)
    assert rc == 0, err
    eng = Engine(out, dtype="bf16", threads=1)
    assert eng.num_layers == 3 and eng.weight_bytes == table.at(3, 3) <= limit
    rec = _read_budget(out)
    assert rec["kind"] == "weight_bytes" and rec["limit"] == limit and rec["dtype"] == "bf16"
    assert rec["removed"] == 3 and rec["predicted"] == rec["measured"] == eng.weight_bytes
    assert f"predicted   3 of 6 layers removed: {eng.weight_bytes:,} bytes" in stdout
    assert "measured / predicted 1.000" in stdout


def test_kv_budget_removes_attentions_and_is_exact(tiny, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"num_layers": 6, "attn_bi": [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]}))
    per_attention = kv_table(tiny, max_seq=100, max_batch=3).attention
    out = tmp_path / "kv"
    rc, stdout, err = run_cli(["prune", tiny, "--method", "attention", "--scores", scores, "--max-kv-bytes",
                               str(int(2.5 * per_attention)), "--max-seq", 100, "--max-batch", 3, "--out", out], capsys)
    assert rc == 0, err
    m = load(out)
    assert m.layer_map.removed_attention == [1, 3, 4, 5]  # the four lowest attn_bi
    eng = Engine(out, threads=1, max_seq=100, max_batch=3)
    assert eng.kv_cache_bytes == 2 * per_attention
    rec = _read_budget(out)
    assert rec["removes"] == "attention sublayers" and (rec["max_seq"], rec["max_batch"]) == (100, 3)
    assert rec["predicted"] == rec["measured"] == eng.kv_cache_bytes


def test_unreachable_budget_on_the_command_line(tiny, tmp_path, capsys):
    best = int(weight_table(tiny, "int8").at(1, 1))
    rc, _, err = run_cli(["prune", tiny, "--method", "random", "--max-weight-bytes", "1000", "--out",
                          tmp_path / "o"], capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert (f"--max-weight-bytes 1,000 bytes cannot be met (int8): the best reachable is {best:,} bytes, "
            f"with 5 of 6 layers removed") in err
    assert not (tmp_path / "o").exists()


def test_unreachable_speedup_from_a_given_table(tiny):
    fake = Costs(1e-3, 1e-4, 2e-4, key={"threads": 1, "cpu": "x", "protocol": {}})
    # a layer costs 0.3 ms, the rest 1 ms: dense 2.8 ms, one layer left 1.3 ms
    with pytest.raises(BudgetError, match=r"--target-speedup 3 cannot be met .* best reachable is 2\.154x, with 5 of 6"):
        layers_for_budget(tiny, Budget("speedup", 3, threads=1), method="last", costs=fake)
    pred = layers_for_budget(tiny, Budget("speedup", 1.5, threads=1), method="last", costs=fake)
    assert pred.count == 4 and pred.layer_map.removed == [1, 2, 3, 4]  # 3 removed: 2.8 / 1.9 = 1.47
    assert pred.predicted == pred.layer_map.budget["predicted"] == pytest.approx(2.8 / 1.6)


# ----------------------------------------------------------------------------- argparse

@pytest.mark.parametrize("args,phrase", [
    (["--target-speedup", "1"], "argument --target-speedup: must be a finite number in (1, inf]"),
    (["--target-speedup", "fast"], "argument --target-speedup: expected a number, got 'fast'"),
    (["--target-speedup", "nan"], "argument --target-speedup: must be a finite number"),
    (["--max-weight-bytes", "12X"], "argument --max-weight-bytes: expected a size like 100M"),
    (["--max-weight-bytes", "0"], "argument --max-weight-bytes: must be between 1 byte"),
    (["--max-kv-bytes", "1.5"], "argument --max-kv-bytes: '1.5' is not a whole number of bytes"),
    (["--target-speedup", "1.3", "--remove", "2"], "argument --remove: not allowed with argument --target-speedup"),
    (["--max-kv-bytes", "1M", "--max-weight-bytes", "1M"], "not allowed with argument --max-kv-bytes"),
    (["--target-speedup", "1.3", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["--target-speedup", "1.3", "--threads", "0"], "argument --threads: must be between 1 and 1024"),
    (["--max-kv-bytes", "1M", "--max-batch", "0"], "argument --max-batch: must be between 1 and 4096"),
])
def test_budget_argument_errors_exit_2_in_one_line(tiny, tmp_path, capsys, args, phrase):
    rc, _, err = run_cli(["prune", tiny, "--method", "last", *args, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,phrase", [
    (["--remove", "2", "--dtype", "int8"], "--dtype applies to --target-speedup and --max-weight-bytes only"),
    (["--max-weight-bytes", "1M", "--threads", "2"], "--threads applies to --target-speedup only"),
    (["--target-speedup", "1.2", "--max-seq", "64"], "--max-seq applies to --max-kv-bytes only"),
    (["--target-speedup", "1.2", "--method", "shortgpt"], "--method shortgpt needs --scores"),
])
def test_options_that_do_not_apply_are_refused_before_measuring(tiny, tmp_path, capsys, args, phrase):
    rc, _, err = run_cli(["prune", tiny, "--method", "last", *args, "--out", tmp_path / "o"], capsys)
    assert rc == 1 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "cache").exists()  # nothing was measured


def test_a_full_out_dir_is_refused_before_measuring(tiny, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    rc, _, err = run_cli(["prune", tiny, "--method", "last", "--target-speedup", "1.2", "--out", tmp_path / "o"],
                         capsys)
    assert rc == 1 and "is not empty; pass --force" in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- the cost cache

@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = costs_mod._measure

    def measure(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(costs_mod, "_measure", measure)
    return calls


def test_costs_are_measured_once_then_read_from_the_cache(tiny, counted):
    first = measure_costs(tiny, "int8", threads=1)
    assert not first.cached and len(counted) == 1 and first.path.is_file()
    assert first.path.parent == costs_mod.cache_dir() / "costs"
    assert len(first.samples) == 5 and {(s["attention"], s["mlp"]) for s in first.samples} == {
        (6, 6), (3, 3), (2, 2), (0, 6), (0, 3)}
    assert first.fixed_s > 0 and first.attention_s >= 0 and first.mlp_s >= 0
    again = measure_costs(tiny, "int8", threads=1)
    assert again.cached and len(counted) == 1
    assert (again.fixed_s, again.attention_s, again.mlp_s, again.key) == (first.fixed_s, first.attention_s,
                                                                           first.mlp_s, first.key)
    key = json.loads(first.path.read_text())["key"]
    assert key["threads"] == 1 and key["dtype"] == "int8" and key["cpu"] == costs_mod.cpu_model()
    other = measure_costs(tiny, "int8", threads=2)  # another key: another file
    assert not other.cached and len(counted) == 2 and other.path != first.path
    measure_costs(tiny, "int8", threads=1, refresh=True)
    assert len(counted) == 3


@pytest.mark.parametrize("spoil", [
    lambda d: "{ not json",
    lambda d: "",
    lambda d: json.dumps({**d, "key": {**d["key"], "cpu": "another CPU"}}),
    lambda d: json.dumps({**d, "format": "shortrt.costs/0"}),
    lambda d: json.dumps({**d, "mlp_s": -1.0}),
    lambda d: json.dumps({**d, "fixed_s": "fast"}),
    lambda d: json.dumps([d]),
])
def test_a_corrupt_or_stale_cache_file_is_measured_again(tiny, counted, spoil):
    first = measure_costs(tiny, "int8", threads=1)
    first.path.write_text(spoil(json.loads(first.path.read_text())))
    again = measure_costs(tiny, "int8", threads=1)
    assert not again.cached and len(counted) == 2
    assert Costs.from_json(json.loads(first.path.read_text()), again.key).fixed_s == again.fixed_s  # rewritten


def test_a_changed_checkpoint_is_another_key(tmp_path, counted):
    path = make_tiny(tmp_path / "m", num_hidden_layers=2)[0]
    measure_costs(path, "fp32", threads=1)
    st = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not measure_costs(path, "fp32", threads=1).cached and len(counted) == 2


def test_costs_one_configuration_at_a_time_when_memory_is_short(tiny, counted, monkeypatch):
    monkeypatch.setattr(costs_mod, "available_memory", lambda: 0)
    c = measure_costs(tiny, "int8", threads=1)
    assert len(c.samples) == 5 and all(s["step_s"] > 0 for s in c.samples)


def test_fit_recovers_a_linear_table_and_keeps_costs_non_negative():
    import numpy as np

    counts = np.array([[1, 30, 30], [1, 15, 15], [1, 8, 8], [1, 0, 15], [1, 0, 8]], float)
    assert np.allclose(costs_mod.fit(counts, counts @ [0.8, 0.05, 0.1]), [0.8, 0.05, 0.1])
    coef = costs_mod.fit(counts, counts @ [0.8, -0.01, 0.1])
    assert coef[1] == 0 and coef[0] > 0 and coef[2] > 0


# ----------------------------------------------------------------------------- end to end

def test_target_speedup_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "fast"
    # a small target: on a model this tiny the fixed part (sampling, the LM head, a Python callback
    # per token) weighs more than on a real one
    rc, stdout, err = run_cli(["prune", tiny, "--method", "last", "--target-speedup", "1.05", "--threads", "1",
                               "--out", out], capsys)
    assert rc == 0, err
    assert "measuring decode costs" in err
    lines = {line.split()[0]: line for line in stdout.splitlines() if line.strip()}
    assert lines["budget"].startswith("budget      decode speedup >= 1.05 (int8, 1 thread, batch 1")
    assert "per decode step: fixed" in lines["costs"] and "cached in" in lines["costs"]
    assert "of 6 layers removed:" in lines["predicted"] and "measured / predicted" in lines["measured"]
    rec = _read_budget(out)
    assert rec["kind"] == "speedup" and rec["target"] == 1.05 and rec["threads"] == 1 and rec["dtype"] == "int8"
    assert rec["predicted"] >= 1.05 and math.isfinite(rec["measured"]) and rec["measured"] > 0
    assert rec["measured_over_predicted"] == pytest.approx(rec["measured"] / rec["predicted"])
    assert rec["context"]["new_tokens"] == 128 and set(rec["costs"]) == {"fixed_s", "attention_s", "mlp_s"}
    m = load(out)
    assert len(m.layer_map.removed) == rec["removed"] >= 1 and m.layer_map.method == "last"
    # a second run reads the table from the cache
    rc, stdout, err = run_cli(["prune", tiny, "--method", "last", "--target-speedup", "1.05", "--threads", "1",
                               "--out", out, "--force"], capsys)
    assert rc == 0 and "measuring decode costs" not in err and "(cached in " in stdout


# ----------------------------------------------------------------------------- the record in shortrt.json

def test_budget_record_survives_pruning_again_and_rewrite_keeps_the_layers(tiny, tmp_path):
    from shortrt.pruning import prune

    rec = {"kind": "weight_bytes", "limit": 10**6}
    first = prune(tiny, LayerMap.from_removed(6, [1], budget=rec), tmp_path / "a")
    assert first.layer_map.budget == rec
    second = prune(first, LayerMap.from_removed(5, [0], budget={"kind": "kv_bytes"}), tmp_path / "b")
    assert second.layer_map.budget == {"kind": "kv_bytes"} and second.layer_map.removed == [0, 1]
    import dataclasses

    updated = rewrite_layer_map(first, dataclasses.replace(first.layer_map, budget={**rec, "measured": 5}))
    assert updated.layer_map.budget["measured"] == 5 and not list(updated.path.glob(".shortrt.json.tmp-*"))
    Engine(updated, threads=1)  # the C++ reader accepts it too
    with pytest.raises(ValueError, match="changes only the records"):
        rewrite_layer_map(first, LayerMap.from_removed(6, [2]))


def test_budget_benchmark_runs_on_a_tiny_model(tiny, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import budget as bench

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"num_layers": 6, "bi": [0.6, 0.1, 0.5, 0.2, 0.4, 0.3],
                                  "attn_bi": [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]}))
    result = bench.main(["--model", str(tiny), "--scores", str(scores), "--targets", "1.05,99",
                         "--attention-targets", "", "--threads", "1", "--json", str(tmp_path / "b.json"),
                         "--md", str(tmp_path / "b.md")])
    rows = result["rows"]
    assert [r["budget"] for r in rows] == ["speedup", "speedup", "weight_bytes", "kv_bytes"]
    assert rows[0]["removed"] >= 1 and rows[0]["measured"] > 0 and "cannot be met" in rows[1]["failed"]
    assert rows[2]["ratio"] == rows[3]["ratio"] == 1.0 and rows[2]["removed"] == 4 and rows[3]["removed"] == 3
    md = (tmp_path / "b.md").read_text()
    assert "| shortgpt | weight_bytes <= " in md and "| attention | kv_bytes <= " in md
    assert json.loads((tmp_path / "b.json").read_text())["costs"]["path"].startswith("<cache>/costs/")
