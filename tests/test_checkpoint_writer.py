"""Writers leave nothing half-done: a prune killed by SIGTERM, SIGHUP or SIGKILL leaves no
staging directory behind (SIGKILL's is removed by the next writer), and non-finite weights are
refused by the Python readers as they are by the engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shortrt
from runtime_models import make_tiny
from slow_writer import start_slow_write
from shortrt.checkpoint import remove_stale_staging
from shortrt.errors import CheckpointError
from shortrt.layermap import LayerMap
from shortrt.reference import ReferenceModel

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("writer") / "dense", tokenizer=True)[0]


def start_slow_prune(src: Path, out: Path) -> subprocess.Popen:
    return start_slow_write(["prune", src, "--layers", "1", "--out", out])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "keep")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_leaves_nothing(tiny, tmp_path, sig):
    (tmp_path / "keep").mkdir()
    out = tmp_path / "pruned"
    proc = start_slow_prune(tiny, out)
    assert any(p.name.startswith(".pruned.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert f"interrupted by {sig.name}" in err
    assert leftovers(tmp_path) == []


def test_sigkill_leftover_is_removed_by_the_next_writer(tiny, tmp_path):
    out = tmp_path / "pruned"
    proc = start_slow_prune(tiny, out)
    proc.kill()
    proc.wait(timeout=30)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp-")]
    assert len(stale) == 1 and any(stale[0].iterdir())  # SIGKILL cannot be caught: a partial dir remains
    shortrt.prune(tiny, LayerMap.from_removed(4, [1]), out)
    assert leftovers(tmp_path) == ["pruned"]  # the dead writer's staging dir is gone
    assert shortrt.load(out).model_config.n_layers == 3


def test_live_writers_staging_is_kept(tmp_path):
    """Only the staging dirs of processes that no longer exist are removed."""
    mine = tmp_path / f".x.tmp-{os.getpid()}-abc"
    mine.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".y.tmp-{other.pid}-abc"
        live.mkdir()
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".z.old-{dead_pid}-abc"
        dead.mkdir()
        user = tmp_path / ".w.tmp-notapid"  # not ours: never touched
        user.mkdir()
        assert remove_stale_staging(tmp_path) == [dead]
        assert mine.exists() and live.exists() and user.exists() and not dead.exists()
    finally:
        other.kill()
        other.wait()


def with_nan(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t["model.layers.2.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_non_finite_weights_are_refused_by_python_readers(tiny, tmp_path, monkeypatch):
    bad = with_nan(tiny, tmp_path / "nan")
    m = shortrt.load(bad)  # headers are fine: the values are only read when used
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.2.mlp.down_proj.weight' in .* holds NaN/Inf "
                                              r"values .*SHORTRT_ALLOW_NONFINITE=1"):
        ReferenceModel.load(bad)
    with pytest.raises(CheckpointError, match="holds NaN/Inf"):
        shortrt.evaluate(m, n_tokens=64, seq_len=32, stride=16, progress=False)
    monkeypatch.setenv("SHORTRT_ALLOW_NONFINITE", "1")
    ref = ReferenceModel.load(bad)  # a warning, and the values as they are
    assert torch.isnan(ref.blocks[2].mlp.w_down).any()


def test_written_source_is_resolvable(tiny, tmp_path, monkeypatch):
    """shortrt.json's `source` is an absolute path even when the user gave a relative one."""
    monkeypatch.chdir(tiny.parent)
    out = shortrt.prune(tiny.name, LayerMap.from_removed(4, [1]), tmp_path / "p")
    doc = json.loads((out.path / "shortrt.json").read_text())
    assert doc["source"] == str(tiny.resolve())
    again = shortrt.prune(out, LayerMap.from_removed(3, [0]), tmp_path / "p2")
    assert json.loads((again.path / "shortrt.json").read_text())["source"] == str(tiny.resolve())
