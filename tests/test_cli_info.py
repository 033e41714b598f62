"""`shortrt info`: the real configuration, and a clean non-zero exit on corrupt weights."""
import json
import shutil
import struct
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "shortrt", *args], capture_output=True, text=True)


def test_help_for_every_subcommand():
    from shortrt.cli import COMMANDS

    for name in COMMANDS:
        res = run_cli(name, "--help")
        assert res.returncode == 0, res.stderr
        assert "usage: shortrt " + name in res.stdout
        assert "%%" not in res.stdout  # argparse formats help= but not description=


def test_info_tiny(tiny_llama):
    res = run_cli("info", str(tiny_llama))
    assert res.returncode == 0, res.stderr
    assert "LlamaForCausalLM" in res.stdout
    assert "layers" in res.stdout and " 4\n" in res.stdout


def test_info_default_model(default_model):
    res = run_cli("info", "default")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for line in ("layers             30", "hidden size        576", "attention heads    9", "KV heads           3"):
        key, value = line.split()[0:-1], line.split()[-1]
        assert any(l.startswith(" ".join(key)) and l.split()[-1] == value for l in out.splitlines()), (line, out)
    assert "134,515,008" in out  # parameters of SmolLM2-135M with tied embeddings


def _corrupt_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(mutate(data))
    return dst


def test_info_truncated_file_exits_nonzero(tiny_llama, tmp_path):
    bad = _corrupt_copy(tiny_llama, tmp_path / "truncated", lambda d: bytes(d[: len(d) // 2]))
    res = run_cli("info", str(bad))
    assert res.returncode != 0
    assert "error" in res.stderr and "model.safetensors" in res.stderr
    assert "Traceback" not in res.stderr


def test_info_lying_header_exits_nonzero(tiny_llama, tmp_path):
    def lie(data):
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, end + 10**9]
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])

    bad = _corrupt_copy(tiny_llama, tmp_path / "lying", lie)
    res = run_cli("info", str(bad))
    assert res.returncode != 0
    assert "error" in res.stderr and "Traceback" not in res.stderr
