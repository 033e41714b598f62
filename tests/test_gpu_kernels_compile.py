"""Every GPU kernel compiles for real GPU targets (cuda:80, cuda:90) at real model shapes, with no
register spills and within the target's shared memory, checked without a GPU (shortrt.kernels.targets).

Triton compiles JITFunctions, not the interpreter's wrappers, and tests/conftest.py turns the
interpreter on for this whole process: the compile runs in a child process without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is optional; its kernels compile where it is installed")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def usage():
    probe = subprocess.run([sys.executable, "-c",
                            "from shortrt.kernels.targets import check_available as c; c()"],
                           env=_env(), capture_output=True, text=True)
    if probe.returncode != 0:
        reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "unknown"
        pytest.skip(f"cannot compile for CUDA targets here: {reason}")
    proc = subprocess.run([sys.executable, "-m", "shortrt.kernels.targets", "--json"], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


EXPECTED = {"rmsnorm", "swiglu", "linear_int8", "rope_write", "attention_split", "attention_combine", "sample"}


def test_every_kernel_compiles_for_both_targets(usage):
    compiled = {(r["kernel"], r["arch"]) for r in usage}
    assert compiled == {(k, a) for k in EXPECTED for a in (80, 90)}


def test_no_spills_and_shared_memory_within_the_limit(usage):
    from shortrt.kernels.targets import Usage, format_table

    print("\n" + format_table([Usage(**r) for r in usage]))
    bad = [r for r in usage if r["spill_stores"] or r["spill_loads"] or r["local"] or r["shared"] > r["shared_limit"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: spills {r['spill_stores']}/"
                              f"{r['spill_loads']} B, local {r['local']} B, shared {r['shared']} of "
                              f"{r['shared_limit']} B" for r in bad)
    assert all(0 < r["registers"] <= 255 for r in usage)


def test_targets_refuse_the_interpreter():
    from shortrt.kernels import targets

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("this process is not interpreted")
    with pytest.raises(targets.TargetsUnavailable, match="TRITON_INTERPRET is set"):
        targets.check_available()
