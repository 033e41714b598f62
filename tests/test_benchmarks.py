"""The benchmark harness: a dying worker becomes a failed row and the run goes on; units and paths."""
import json
import sys
from pathlib import Path

import pytest

from runtime_models import make_tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import latency  # noqa: E402
import runtime  # noqa: E402

# What llama-cpp-python's Q8_0 does on AVX-512/AMX machines, in a worker of our own.
SEGFAULT = ("import os, signal, sys; sys.stderr.write('loading the model\\nggml: about to crash\\n'); "
            "sys.stderr.flush(); os.kill(os.getpid(), signal.SIGSEGV)")


def crash_where(monkeypatch, which):
    """Workers whose spec satisfies which(spec) segfault; the others run for real."""
    real = harness.worker_command
    monkeypatch.setattr(harness, "worker_command",
                        lambda spec: [sys.executable, "-c", SEGFAULT] if which(spec) else real(spec))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(harness, "measure_bandwidth", lambda threads, *a, **k: 10e9)  # no 512 MiB passes
    path, _ = make_tiny(tmp_path / "tiny", tokenizer=True, max_position_embeddings=harness.CONTEXT)
    return path


def test_latency_run_survives_a_segfaulting_worker(tiny, tmp_path, monkeypatch, capsys):
    import shortrt.data

    monkeypatch.setattr(shortrt.data, "heldout_texts", lambda name="persuasion": ["Once upon a time there was a little model. " * 20])
    crash_where(monkeypatch, lambda spec: spec["engine"] == "transformers")
    out = tmp_path / "latency.json"
    latency.main(["--model", str(tiny), "--remove", "0", "--extra-variants", "", "--rounds", "2",
                  "--engines", "shortrt-fp32,transformers-fp32", "--prompt-tokens", "32", "--new-tokens", "8",
                  "--json", str(out)])
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    good, bad = rows["shortrt fp32"], rows["transformers fp32"]
    assert good["decode_tok_s"] > 0 and good["rounds"] == 2 and "failed" not in good
    assert good["bound_tok_s"] == pytest.approx(10e9 / good["bytes_per_token"])
    assert bad["failed"] == "killed by SIGSEGV" and bad["returncode"] == -11
    assert "ggml: about to crash" in bad["stderr_tail"] and "decode_tok_s" not in bad
    assert bad["rounds"] == 0  # not run again in round 2
    md = capsys.readouterr().out
    assert "| transformers fp32 | dense | 0 | - | FAILED: killed by SIGSEGV |" in md
    assert "ggml: about to crash" in md


def test_runtime_run_survives_a_segfaulting_worker(tiny, tmp_path, monkeypatch, capsys):
    crash_where(monkeypatch, lambda spec: spec["engine"] == "shortrt" and spec["dtype"] == "bf16" and not spec["skip"])
    out = tmp_path / "runtime.json"
    runtime.main(["--model", str(tiny), "--skip", "1,2", "--quick", "--reps", "1", "--prompt-tokens", "32",
                  "--new-tokens", "8", "--json", str(out)])
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["shortrt bf16"]["failed"] == "killed by SIGSEGV"
    for label in ("shortrt fp32", "shortrt int8", "shortrt bf16 -2 layers", "shortrt fp32 -2 layers"):
        assert rows[label]["decode"] > 0 and "failed" not in rows[label]
    assert rows["shortrt fp32 -2 layers"]["layers"] == 2
    assert rows["pair bf16"]["skip"] > 0  # the pair worker is not the one that crashed
    text = capsys.readouterr().out
    assert "shortrt bf16                FAILED: killed by SIGSEGV" in text
    assert "KV cache fp32: pruned / dense = 0.5000 (2/4 = 0.5000)" in text
    assert "KV cache bf16" not in text  # needs the failed row


@pytest.mark.parametrize("code, why", [
    ("import sys; sys.exit(3)", "exit code 3"),
    ("print('no result here')", "no parseable RESULT line on stdout"),
    ("print('RESULT {not json')", "no parseable RESULT line on stdout"),
    ("import time; time.sleep(30)", "timed out after 1 s"),
])
def test_run_worker_records_every_kind_of_failure(monkeypatch, code, why):
    monkeypatch.setattr(harness, "worker_command", lambda spec: [sys.executable, "-c", code])
    r = harness.run_worker({"threads": 1}, timeout_s=1)
    assert r["failed"] == why


def test_run_worker_forces_the_jobs_kernel_path(monkeypatch):
    # kernel_paths.py compares paths by giving each shortrt job its SHORTRT_KERNELS.
    code = "import json, os; print('RESULT ' + json.dumps({'k': os.environ.get('SHORTRT_KERNELS', 'unset')}))"
    monkeypatch.setattr(harness, "worker_command", lambda spec: [sys.executable, "-c", code])
    monkeypatch.delenv("SHORTRT_KERNELS", raising=False)
    assert harness.run_worker({"threads": 1, "kernels": "avx2"})["k"] == "avx2"
    assert harness.run_worker({"threads": 1})["k"] == "unset"


def test_merge_rounds_keeps_good_rounds_of_a_job_that_failed_later():
    job = {"label": "x"}
    row = harness.merge_rounds(job, [{"decode_tok_s": 10.0, "layers_run": 4},
                                     {"decode_tok_s": 20.0, "layers_run": 4},
                                     {"failed": "killed by SIGKILL", "returncode": -9, "stderr_tail": ""}])
    assert row["decode_tok_s"] == 15.0 and row["rounds"] == 2
    assert row["failed_round"] == "killed by SIGKILL" and "failed" not in row


def test_bandwidth_is_bytes_of_the_buffer_the_kernel_reads(monkeypatch):
    from shortrt import _C

    asked = []

    def fake(mbytes, path, threads, iters, huge):
        asked.append(mbytes)
        return {"wall": [0.5] * iters}

    monkeypatch.setattr(_C, "bench_read_bandwidth", fake)
    bw = harness.measure_bandwidth(2, buffer_bytes=512 * 2**20, reps=3)
    assert asked == [512 * 2**20 / 1e6] * 2  # the kernel's size argument is in MB (1e6 bytes)
    assert bw == pytest.approx(2 * 512 * 2**20)


def test_shown_path_hides_the_measuring_machines_cache_and_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "c"))
    assert harness.shown_path(tmp_path / "c" / "models" / "m") == "<cache>/models/m"
    assert harness.shown_path(BENCH / "results" / "x.json") == "benchmarks/results/x.json"
    assert harness.shown_path("/elsewhere/x") == "/elsewhere/x"


def test_quality_paired_gaps_against_dense():
    """quality.py's table against dense: a paired accuracy gap and its standard error, a ppl ratio."""
    import quality

    def cell(correct, nll):
        return {"tasks": {"arc_easy": {"acc": sum(correct) / 4, "acc_se": 0.1, "items": {"correct": correct}},
                          "ppl": {"ppl": 2.0, "items": {"window_nll": nll, "window_tokens": [10, 10]}}}}

    results = {"dense": cell([1, 1, 0, 1], [10.0, 10.0]), "shortgpt-8": cell([1, 0, 0, 1], [12.0, 14.0])}
    gap, se = quality.paired_gap(results, "shortgpt-8", "dense", "arc_easy")
    assert gap == pytest.approx(-0.25) and se == pytest.approx(0.25)  # d = 0,-1,0,0: sd 0.5 / sqrt 4
    lines = quality.vs_dense(results, ["shortgpt"], [0, 8], ["ppl", "arc_easy"])
    row = [x for x in lines if x.startswith("| shortgpt-8")][0]
    assert row == "| shortgpt-8 | ×1.35 | -25.0 ± 25.0 | -25.0 ± 25.0 |"  # exp(6 / 20) = 1.35


def test_healing_benchmark_variants_and_report(tmp_path):
    import healing

    assert healing.parse_variant("r8=rank=8,lr=3e-3") == ("r8", {"rank": 8, "lr": 3e-3})
    assert healing.parse_variant("full=full=1") == ("full", {"full": True})
    with pytest.raises(SystemExit, match="'depth' is not one of"):
        healing.parse_variant("x=depth=3")
    with pytest.raises(SystemExit, match="expected NAME=key=value"):
        healing.parse_variant("lonely")
    rec = {"trainable_parameters": 1.79e6, "steps": 40, "best_step": 40, "ppl_before": 111.3, "ppl_after": 55.3,
           "tokens_per_second": 191.0, "seconds": {"total": 594.0},
           "history": [[0, None, 1.18, 111.3], [20, 0.7, 0.63, 57.3], [40, 0.6, 0.59, 55.3]]}
    doc = {"meta": {"machine": {"date": "2026-12-01", "cpu": "AMD EPYC", "cores": 2}, "start": "shortgpt-8",
                    "command": "python benchmarks/healing.py", "eval": {"n_tokens": 8192}},
           "reference": {"dense": {"ppl": 40.0, "ppl_sciq": 20.0}, "start": {"ppl": 120.0, "ppl_sciq": 60.0}},
           "runs": [{"name": "r8", "record": rec, "final": {"ppl": 60.0, "ppl_sciq": 25.0}, "tokens_per_step": 2048}]}
    md = healing.markdown(doc)
    assert "| r8 | 1.79 M | 40 (40) | 81920 | 111.3 → 55.3 | 60.00 (×1.50) | 25.00 (×1.25) | 191 | 594 s |" in md
    healing.plot(doc, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_scale_rerun_of_one_step_keeps_the_other_steps_rows(tmp_path):
    import scale

    machine = {"cpu": "AMD EPYC", "cores": 2, "date": "2026-12-01"}
    first = {"command": "python benchmarks/scale.py --steps calibrate,prune", "machine": machine, "shape": "s",
             "weights_bytes": 10, "rows": [{"step": "calibrate", "seconds": 5, "peak_rss_bytes": 2**30},
                                           {"step": "prune", "seconds": 1, "peak_rss_bytes": 2**29}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(first))
    second = {"command": "python benchmarks/scale.py --steps generate", "machine": machine, "shape": "s",
              "weights_bytes": 10, "bandwidth_gb_s": 19.0,
              "rows": [{"step": "generate bf16 dense", "seconds": 3, "peak_rss_bytes": 2**31, "decode_tok_s": 1.0,
                        "bytes_per_token": 1e9, "bandwidth_share": 0.5}]}
    merged = scale.merged_with_earlier(path, second, ["generate"])
    assert [r["step"] for r in merged["rows"]] == ["calibrate", "prune", "generate bf16 dense"]
    assert merged["rows"][0]["command"] == first["command"] and "command" not in merged["rows"][2]
    assert "from an earlier run, `python benchmarks/scale.py --steps calibrate,prune`" in scale.markdown(merged)
    # Rerunning a step replaces its row; another shape or other weights start afresh.
    assert [r["step"] for r in scale.merged_with_earlier(path, first, ["calibrate", "prune"])["rows"]] == \
        ["calibrate", "prune"]
    assert scale.merged_with_earlier(path, {**second, "weights_bytes": 11}, ["generate"]) == \
        {**second, "weights_bytes": 11}
    path.write_text(json.dumps(merged))
    (tmp_path / "t.json").write_text(json.dumps({**second, "shape": "t", "weights_bytes": 40}))
    png = scale.chart(tmp_path)
    assert png == tmp_path / "costs.png" and png.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no scale results"):
        scale.chart(tmp_path / "empty")


def test_gpu_benchmark_dry_run_records_rows_and_a_crashed_worker(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu.py's code path on the CPU (tiny shape, torch kernels): every gpueng row measured,
    the transformers worker's segfault recorded as its rows' failure, gpu.json and gpu.md written."""
    import gpu

    crash_where(monkeypatch, lambda spec: spec["engine"] == "transformers-gpu")
    result = gpu.main(["--dry-run", "--dtypes", "bf16", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    mine = [r for r in rows if r["engine"] == "gpueng"]
    assert [(r["variant"], r["batch"]) for r in mine] == [(v, b) for v in gpu.VARIANTS for b in (1, 2)]
    for r in mine:
        assert "failed" not in r and r["tok_s"] > 0 and r["step_ms"] > 0 and r["bytes_per_step"] > 0
    layers = {r["variant"]: r["layers"] for r in mine}
    assert layers == {"dense": 6, "layers": 4, "attention": 6}
    assert {r["variant"]: r["attentions"] for r in mine} == {"dense": 6, "layers": 4, "attention": 4}
    peers = [r for r in rows if r["engine"] == "transformers-gpu"]
    assert len(peers) == 4 and all(r["failed"] == "killed by SIGSEGV" for r in peers)
    md = (tmp_path / "gpu.md").read_text()
    assert "| transformers-gpu | tiny | bf16 | dense | 1 | FAILED: killed by SIGSEGV |" in md
    assert md in capsys.readouterr().out


def test_gpu_check_script_parses_and_its_dry_run_writes_every_file(tmp_path):
    """benchmarks/gpu_check.sh on the CPU (--dry-run): the gpu-marked tests collected (skipped without a
    GPU), the tiny benchmark run, every result in the one folder. It has never run on a GPU here."""
    import subprocess

    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(__import__("os").environ, PYTHON=sys.executable, PYTHONPATH=str(BENCH.parent))
    proc = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"env.txt", "pytest-gpu.txt", "pytest-gpu.xml", "gpu.json", "gpu.md", "gpu-bench.txt",
                     "summary.txt"}
    assert "skipped" in (tmp_path / "out" / "pytest-gpu.txt").read_text()
    rows = json.loads((tmp_path / "out" / "gpu.json").read_text())["rows"]
    assert rows and all("failed" not in r and r["tok_s"] > 0 for r in rows)




# ----------------------------------------------------------------------------- llama_cpp_quality.py

def fake_llama_bin(tmp_path, monkeypatch, name, script):
    """$SHORTRT_LLAMA_CPP_BIN pointed at a directory whose `name` is this shell script."""
    import llama_cpp_tools as lc

    d = tmp_path / "fakebin"
    d.mkdir(exist_ok=True)
    exe = d / name
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv(lc.BIN_ENV, str(d))
    return exe


def test_protocol_perplexity_scores_the_second_half_of_each_window():
    import math

    import llama_cpp_tools as lc
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    vocab, ctx, chunks = 11, 8, 3
    ids = rng.integers(0, vocab, ctx * chunks + 5).tolist()
    table = rng.standard_normal((vocab, vocab)).astype(np.float32)  # logits = a function of the token
    seen = []

    def logits_of(window):
        seen.append(list(window))
        return table[window]

    got = lc.protocol_perplexity(logits_of, ids, ctx, chunks)
    nll, n = 0.0, 0
    for c in range(chunks):
        w = ids[c * ctx:(c + 1) * ctx]
        logp = torch.log_softmax(torch.from_numpy(table[w]).double(), -1)
        for j in range(ctx // 2 + 1, ctx):
            nll -= float(logp[j - 1, w[j]])
            n += 1
    assert n == chunks * (ctx // 2 - 1)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-12)
    assert seen == [ids[c * ctx:(c + 1) * ctx] for c in range(chunks)]
    lc.protocol_perplexity(logits_of, ids, ctx, chunks, bos_id=7)
    assert all(w[0] == 7 for w in seen[chunks:])
    with pytest.raises(ValueError, match="need 40 tokens, got 29"):
        lc.protocol_perplexity(logits_of, ids, 10, 4)


def test_llama_perplexity_crash_is_a_failed_row_and_a_lost_last_line_is_recovered(tmp_path, monkeypatch):
    import llama_cpp_quality as lq
    import llama_cpp_tools as lc

    spec = {"gguf": str(tmp_path / "m.gguf"), "text_file": str(tmp_path / "t.txt"), "ctx": 64, "chunks": 2,
            "threads": 1, "kv": "f16", "prompt": [1, 2], "greedy_tokens": 4}
    fake_llama_bin(tmp_path, monkeypatch, "llama-perplexity", "echo 'loading, about to crash' >&2; kill -SEGV $$")
    r = lq.worker_llamacpp(spec)
    assert r["failed"] == "llama-perplexity killed by SIGSEGV" and r["returncode"] == -11
    assert "about to crash" in r["stderr_tail"]
    # llama.cpp's log thread can lose the last lines at exit: the estimate of 2 windows is the running
    # value after window 2 of a 3-window run
    args = tmp_path / "args"
    fake_llama_bin(tmp_path, monkeypatch, "llama-perplexity",
                   f"echo \"$@\" > {args}; "
                   "echo 'perplexity: calculating perplexity over 3 chunks, n_ctx=64' >&2; "
                   "echo 'perplexity: 0.50 seconds per pass - ETA 0.00 minutes' >&2; printf '[1]5.5,[2]6.25,'")
    assert lc.perplexity_run(Path(spec["gguf"]), Path(spec["text_file"]), ctx=64, chunks=2) == {
        "ppl": 6.25, "attempts": 1, "window_tok_s": 128.0}
    assert "--chunks 3" in args.read_text() and "-ctk f32 -ctv f32" in args.read_text()
    fake_llama_bin(tmp_path, monkeypatch, "llama-perplexity",
                   "echo 'perplexity: calculating perplexity over 3 chunks, n_ctx=64' >&2; echo '[1]5.5,'")
    with pytest.raises(lc.LlamaCppError, match="printed no estimate in 2 runs"):
        lc.perplexity_run(Path(spec["gguf"]), Path(spec["text_file"]), ctx=64, chunks=2, attempts=2)
    fake_llama_bin(tmp_path, monkeypatch, "llama-perplexity",
                   "echo 'perplexity: calculating perplexity over 2 chunks, n_ctx=64' >&2")
    with pytest.raises(lc.LlamaCppError, match="found only 2 windows"):
        lc.perplexity_run(Path(spec["gguf"]), Path(spec["text_file"]), ctx=64, chunks=2)


def test_llama_cpp_quality_refuses_to_run_without_llama_cpp(monkeypatch):
    import llama_cpp_quality as lq
    import llama_cpp_tools as lc

    monkeypatch.delenv(lc.BIN_ENV, raising=False)
    with pytest.raises(SystemExit, match="llama-perplexity not found: set SHORTRT_LLAMA_CPP_BIN"):
        lq.main(["--model", "x=/nonexistent"])
    with pytest.raises(SystemExit):
        lq.main(["--kv", "int3"])  # argparse: unknown --kv


def _llama_cpp_missing():
    import llama_cpp_tools as lc

    missing = [n for n in ("llama-perplexity", "llama-server", "llama-quantize") if lc.binary(n) is None]
    return lc.skip_reason(missing[0]) if missing else None


@pytest.mark.skipif(_llama_cpp_missing() is not None, reason=str(_llama_cpp_missing()))
def test_llama_cpp_quality_rows_score_the_same_tokens(tiny, tmp_path, monkeypatch):
    """The benchmark's whole path on a tiny model in real llama.cpp: F32 gives shortrt fp32's
    perplexity and greedy tokens on the same ids; a crashing row is recorded and the run goes on."""
    import llama_cpp_quality as lq

    crash_where(monkeypatch, lambda spec: spec.get("type") == "Q8_0" and spec["kv"] == "f16")
    out, md = tmp_path / "q.json", tmp_path / "q.md"
    lq.main(["--model", f"tiny={tiny}", "--ctx", "64", "--chunks", "3", "--greedy-tokens", "12",
             "--shortrt", "fp32,int4,int4:int4", "--llama", "F32,Q8_0,Q4_0,Q4_1", "--kv", "fp32,f16",
             "--work", str(tmp_path / "work"), "--json", str(out), "--md", str(md)])
    res = json.loads(out.read_text())["results"]["tiny"]
    assert res["heldout"]["tokenizers_identical"] and res["heldout"]["tokens"] >= 64 * 3
    rows = {(r["label"], r["kv"]) + ((r["lm_head"],) if r["label"].startswith("shortrt") else ()): r
            for r in res["rows"]}
    ref = rows["shortrt fp32", "fp32", "fp32"]
    f32 = rows["llama.cpp F32", "f32"]
    assert f32["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)  # same ids, same windows, same weights
    assert f32["greedy"] == ref["greedy"] and f32["greedy_equal"] == 12 == len(ref["greedy"])
    assert (f32["weights"], f32["lm_head"]) == ("F32 ×28", "F32")  # 4 layers × 7 matrices, read from the file
    q41 = rows["llama.cpp Q4_1", "f32"]
    assert (q41["weights"], q41["lm_head"], q41["made_by"]) == ("Q4_1 ×28", "Q8_0", "quantize")
    q40 = rows["llama.cpp Q4_0", "f16"]
    assert (q40["weights"], q40["lm_head"], q40["made_by"]) == ("Q4_0 ×28", "Q8_0", "export") and q40["ppl"] > 0
    crashed = rows["llama.cpp Q8_0", "f16"]
    assert crashed["failed"] == "killed by SIGSEGV" and "ppl" not in crashed
    assert "ppl" in rows["llama.cpp Q8_0", "f32"]
    for head in ("int8", "int4"):
        r = rows["shortrt int4", "f16", head]
        assert r["weights"] == "int4" and abs(r["ppl_vs_fp32"] - 1) < 0.05
    text = md.read_text()
    assert "| llama.cpp Q8_0 | Q8_0 ×" in text and "FAILED: killed by SIGSEGV" in text
    assert "int4 (LM head int8, KV fp32)" in text and "vs Q4_0" in text and "vs Q4_1" in text


def test_latency_targets_compare_the_matching_rows():
    def row(decode, prefill, bound=None):
        return {"decode_tok_s": decode, "prefill_tok_s": prefill, "bound_tok_s": bound or 2 * decode}

    by = {("shortrt int4 (head int8)", "dense", 0): row(130.0, 600.0, 150.0),
          ("shortrt int4 (head int8)", "shortgpt", 8): row(150.0, 700.0),
          ("llama.cpp Q4_0", "dense", 0): row(100.0, 400.0),
          ("transformers fp32", "dense", 0): row(20.0, 550.0),
          ("shortrt int8", "dense", 0): row(120.0, 900.0, 200.0),
          ("shortrt fp32", "dense", 0): row(50.0, 500.0, 55.0)}
    lines = latency.target_lines(by)
    assert "- decode shortrt int4 (head int8) dense / llama.cpp Q4_0 dense: 1.30× (target ≥ 1.30×: met)" in lines
    assert "- decode shortrt int4 (head int8) -8 layers / llama.cpp Q4_0 dense: 1.50× (target ≥ 1.60×: MISSED)" in lines
    # prefill is against the faster peer: transformers' 550, not llama.cpp's 400
    assert ("- prefill shortrt int4 (head int8) / the faster of llama.cpp Q4_0 and transformers fp32 (550 tok/s): "
            "1.09× (target ≥ 1.20×: MISSED)") in lines
    assert "- decode shortrt int4 (head int8) of its bandwidth bound: 87% (target ≥ 85%: met)" in lines
    assert "- decode shortrt fp32 of its bandwidth bound: 91% (target ≥ 90%: met)" in lines
    assert "- decode shortrt int8 of its bandwidth bound: 60% (target ≥ 85%: MISSED)" in lines
    assert "- prefill shortrt int8 / shortrt fp32: 1.80× (target ≥ 2.00×: MISSED)" in lines
    assert not any("llama.cpp Q8_0" in line and "decode" in line for line in lines)  # no Q8_0 row: undecided
    assert latency.target_lines({}) == ["- (none of the rows the targets compare were measured)"]


def test_llamacpp_types_are_checked_before_anything_is_quantized():
    with pytest.raises(ValueError, match=r"unknown llama.cpp type\(s\) Q3_X \(known: F32, F16, Q8_0, Q4_0"):
        harness.llamacpp_ggufs(("F32", "Q3_X"), source="/nonexistent.gguf")


def test_quality_rows_agree_with_the_reference_as_measured():
    import numpy as np

    row = {"logits": np.array([1.0, 2.0, -3.0]), "greedy": [5, 6, 7, 8], "ppl": 11.0}
    ref = {"logits": np.array([1.0, 2.0, -4.0]), "greedy": [5, 6, 9, 8], "ppl": 10.0}
    assert harness.agreement(row, ref) == {"rel_err": 0.25, "greedy_first_diff": 2, "greedy_equal": 3,
                                          "ppl_vs_fp32": pytest.approx(1.1)}
    assert harness.agreement(ref, ref)["greedy_first_diff"] == 4  # never differs: the whole length
