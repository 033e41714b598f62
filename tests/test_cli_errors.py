"""Every bad command-line argument or checkpoint exits non-zero with one line naming the problem."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from runtime_models import make_tiny
from shortrt.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli") / "m", tokenizer=True)[0]


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("args,phrase", [
    (["--seed", "-1"], "argument --seed: must be between 0 and"),
    (["-n", "99999999999"], "argument --max-new-tokens/-n: must be between 0 and 2147483647, got 99999999999"),
    (["-n", "ten"], "argument --max-new-tokens/-n: expected an integer, got 'ten'"),
    (["--temperature", "nan"], "argument --temperature/-t: must be a finite number"),
    (["--temperature", "-1"], "argument --temperature/-t: must be a finite number in [0, inf]"),
    (["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1]"),
    (["--top-k", "-2"], "argument --top-k: must be between 0 and"),
    (["--threads", "0"], "argument --threads: must be between 1 and 1024"),
    (["--skip", "1,x"], "argument --skip: expected comma-separated layer indices"),
    (["--skip", "0,1,2,3"], "skip_layers leaves no layer to run (the checkpoint has 4)"),
    (["--skip", "9"], "skip_layers: layer 9 is out of range for a checkpoint of 4 layers"),
])
def test_generate_bad_arguments(tiny, capsys, args, phrase):
    rc, err = run_cli(["generate", tiny, "-p", "Once", *args], capsys)
    assert rc != 0
    assert phrase in err
    assert err.count("\n") == 1, err


def test_prompt_longer_than_context(tiny, capsys):
    rc, err = run_cli(["generate", tiny, "-p", "Once upon a time " * 200, "-n", "4"], capsys)
    assert rc == 1 and "exceeds the context of 256" in err and err.count("\n") == 1


def test_non_utf8_prompt_is_refused(tiny):
    res = subprocess.run([sys.executable, "-m", "shortrt", "generate", str(tiny), "-p", b"caf\xe9".decode(
        "utf-8", "surrogateescape")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().endswith("argument --prompt/-p: is not valid UTF-8 text (see shortrt generate --help)")
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("args,phrase", [
    (["prune", "{m}", "--layers", "a,b", "--out", "{out}"], "argument --layers: expected comma-separated"),
    (["prune", "{m}", "--layers", "7", "--out", "{out}"], "removed layer index 7 is out of range"),
    (["prune", "{m}", "--remove", "0", "--out", "{out}"], "argument --remove: must be between 1 and"),
    (["prune", "{m}", "--ratio", "2", "--out", "{out}"], "argument --ratio: must be a finite number in (0, 1]"),
    (["eval", "{m}", "--tokens", "0"], "argument --tokens: must be between 1 and"),
    (["calibrate", "{m}", "--seq-len", "1"], "argument --seq-len: must be between 2 and"),
    (["replace", "{m}", "--remove", "2", "--lr", "0", "--out", "{out}"], "argument --lr: must be a finite number"),
    (["info", "{out}"], "not found: give 'default', a checkpoint directory, or a .gguf file"),
    (["calibrate", "{m}", "--out", "{out}.json", "--data", "default", "{out}.txt"],
     "--data: 'default' cannot be combined with files"),
    (["calibrate", "{m}", "--out", "{out}.json", "--seq-len", "64", "--data", "{out}.txt"], "data file not found:"),
    (["calibrate", "{m}", "--out", "{out}.json", "--seq-len", "64", "--data", "{m}"], "holds no .txt or .jsonl files"),
])
def test_other_commands_bad_arguments(tiny, tmp_path, capsys, args, phrase):
    argv = [a.format(m=tiny, out=tmp_path / "out") for a in args]
    rc, err = run_cli(argv, capsys)
    assert rc != 0 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def edited(tiny, tmp_path, **changes):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(changes)
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def test_bad_checkpoints_are_one_line_errors(tiny, tmp_path, capsys):
    rc, err = run_cli(["info", edited(tiny, tmp_path, num_attention_heads=0)], capsys)
    assert rc == 1 and "'num_attention_heads' must be a positive integer, got 0" in err and err.count("\n") == 1
    shutil.rmtree(tmp_path / "bad")
    weights_dir = edited(tiny, tmp_path)
    (weights_dir / "model.safetensors").unlink()
    (weights_dir / "model.safetensors").mkdir()
    rc, err = run_cli(["info", weights_dir], capsys)
    assert rc == 1 and "model.safetensors: it is a directory, not a safetensors file" in err
    rc, err = run_cli(["generate", weights_dir, "-p", "x"], capsys)
    assert rc == 1 and "model.safetensors: it is a directory" in err and err.count("\n") == 1


def test_truncated_header_is_reported_by_info(tiny, tmp_path, capsys):
    """The README's claim: a truncated or lying file is reported, not run."""
    bad = edited(tiny, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    rc, err = run_cli(["info", bad], capsys)
    assert rc == 1 and "model.safetensors" in err and err.count("\n") == 1
