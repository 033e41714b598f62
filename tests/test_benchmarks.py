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
