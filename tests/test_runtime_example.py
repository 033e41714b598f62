"""The embedding example (examples/generate_ids.cpp, no Python) and the `shortrt generate` command."""
import os
import subprocess
from pathlib import Path

import pytest

import shortrt
from runtime_models import make_tiny
from shortrt.engine import Engine


def example_binary() -> Path:
    """setup.py builds examples into shortrt/bin/; SHORTRT_GENERATE_IDS overrides (hand builds)."""
    path = Path(os.environ.get("SHORTRT_GENERATE_IDS") or Path(shortrt.__file__).parent / "bin" / "generate_ids")
    assert path.is_file(), f"{path} is missing: build with `pip install -e . --no-build-isolation`"
    return path


@pytest.mark.parametrize("dtype,skip", [("fp32", None), ("int8", "1")])
def test_generate_ids_example_matches_python(tmp_path, dtype, skip):
    path, _ = make_tiny(tmp_path / "m")
    prompt = [1, 17, 250, 3, 99]
    cmd = [str(example_binary()), str(path), "--dtype", dtype, "--threads", "2", "--max-new-tokens", "12"]
    if skip:
        cmd += ["--skip", skip]
    proc = subprocess.run(cmd + [str(i) for i in prompt], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = Engine(path, dtype=dtype, skip_layers=[int(skip)] if skip else None).generate_ids(prompt, max_new_tokens=12)
    assert [int(t) for t in proc.stdout.split()] == expected


def test_generate_ids_example_reports_errors(tmp_path):
    path, _ = make_tiny(tmp_path / "m")
    proc = subprocess.run([str(example_binary()), str(path), "--dtype", "fp4", "1", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "unknown dtype 'fp4'" in proc.stderr
    proc = subprocess.run([str(example_binary()), str(path), "1", "999"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "outside the vocabulary" in proc.stderr


def test_cli_generate(tmp_path, capsys):
    from shortrt.cli import main

    path, _ = make_tiny(tmp_path / "m", tokenizer=True)
    base = ["generate", str(path), "-p", "Once upon", "-n", "8"]
    assert main(base) == 0
    expected = Engine(path).generate("Once upon", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"
    assert main(base + ["--stream", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(base + ["-p", "The quick", "--skip", "1,2"]) == 0
    assert capsys.readouterr().out.splitlines() == Engine(path, skip_layers=[1, 2], max_batch=2).generate(
        ["Once upon", "The quick"], max_new_tokens=8)
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--top-p", "2"])
    assert exit_info.value.code == 2
    assert "argument --top-p: must be a finite number in (0, 1], got 2" in capsys.readouterr().err
