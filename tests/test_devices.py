"""--device / device= for calibrate, replace and heal: checked before anything is loaded, and the
device-agnostic code paths (masks, rotary positions, LoRA adapters, states) on the CPU.

The same functions on a real GPU are the `gpu`-marked tests at the end (skipped without CUDA:
nothing here has run on a GPU until benchmarks/gpu_check.sh has been run on one)."""
import pytest
import torch

import shortrt
from conftest import run_cli
from runtime_models import make_tiny, prose
from shortrt.devices import resolve_device, work_dtype
from shortrt.errors import DeviceUnavailableError, ShortrtError
from shortrt.layermap import LayerMap

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
no_gpu = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a usable GPU")

@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path, _ = make_tiny(tmp_path_factory.mktemp("devices") / "dense", num_hidden_layers=4, tokenizer=True)
    return path


# ---- the one device check ----------------------------------------------------------------------

def test_cpu_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert work_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("bad", ["gpu", "xpu", "metal", "cuda:x", ""])
def test_unknown_devices_are_named(bad):
    with pytest.raises(ValueError, match=r"unknown device .*choose cpu, cuda or cuda:N"):
        resolve_device(bad)


def test_a_device_must_be_a_string():
    with pytest.raises(ShortrtError, match="device must be a string"):
        resolve_device(3)


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_says_why(name):
    with pytest.raises(DeviceUnavailableError, match=r"device 'cuda(:\d)?' is not usable: (this torch .* was built "
                                                    r"without CUDA|no usable CUDA GPU)"):
        resolve_device(name)


# ---- refused before anything is loaded ---------------------------------------------------------

@no_gpu
def test_python_functions_refuse_cuda_before_loading(tmp_path):
    missing = tmp_path / "no-such-model"  # loading it would fail with a different message
    lmap = LayerMap.from_removed(4, [1, 2], method="span")
    calls = [lambda: shortrt.calibrate(missing, device="cuda", progress=False),
             lambda: shortrt.replace(missing, lmap, tmp_path / "r", device="cuda", progress=False),
             lambda: shortrt.heal(missing, tmp_path / "h", device="cuda", progress=False)]
    for call in calls:
        with pytest.raises(DeviceUnavailableError, match="device 'cuda' is not usable"):
            call()
    assert not (tmp_path / "r").exists() and not (tmp_path / "h").exists()


@no_gpu
@pytest.mark.parametrize("command", [["calibrate", "--out", "{tmp}/s.json"],
                                     ["heal", "--out", "{tmp}/healed"]])
def test_commands_refuse_cuda_in_one_line(command, tmp_path, capsys):
    argv = [command[0], str(tmp_path / "no-such-model")] + [a.format(tmp=tmp_path) for a in command[1:]]
    rc, out, err = run_cli(argv + ["--device", "cuda"], capsys)
    assert rc == 2
    assert "device 'cuda' is not usable" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@no_gpu
def test_replace_command_refuses_cuda(dense, tmp_path, capsys):
    scores = shortrt.calibrate(dense, prose(), n_tokens=512, seq_len=64, progress=False)
    scores.save(tmp_path / "scores.json")
    rc, _, err = run_cli(["replace", dense, "--scores", tmp_path / "scores.json", "--remove", "2",
                          "--out", tmp_path / "r", "--device", "cuda:0"], capsys)
    assert rc == 2 and "device 'cuda:0' is not usable" in err, err
    assert not (tmp_path / "r").exists()


def test_bad_device_value_on_the_command_line(tmp_path, capsys):
    rc, _, err = run_cli(["calibrate", tmp_path / "m", "--out", tmp_path / "s.json", "--device", "tpu"], capsys)
    assert rc == 2 and "argument --device: expected cpu, cuda or cuda:N, got 'tpu'" in err


# ---- the GPU code path's bf16 on the CPU ------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_bf16_calibration_is_close_to_fp32(dense, monkeypatch, stream):
    """The dtype the GPU path runs in (bf16), on the CPU: the same scores to bf16 rounding."""
    import shortrt.devices as devices

    ref = shortrt.calibrate(dense, prose(), n_tokens=1024, seq_len=64, stream=stream, progress=False)
    monkeypatch.setattr(devices, "work_dtype", lambda device: torch.bfloat16)
    low = shortrt.calibrate(dense, prose(), n_tokens=1024, seq_len=64, stream=stream, progress=False)
    assert low.data["dtype"] == "bfloat16" and ref.data["dtype"] == "float32"
    assert low.data["device"] == "cpu"
    for a, b in zip(ref.bi, low.bi):
        assert abs(a - b) <= 0.02 * max(a, 1e-3) + 2e-3, (ref.bi, low.bi)


def test_records_name_the_device(dense, tmp_path):
    lmap = LayerMap.from_removed(4, [1, 2], method="span")
    rep = shortrt.replace(dense, lmap, tmp_path / "r", texts=prose(), n_tokens=1024, seq_len=64, steps=4,
                          batch=4, progress=False)
    assert rep.layer_map.replacement["device"] == "cpu"
    pruned = shortrt.prune(dense, LayerMap.from_removed(4, [1], method="manual"), tmp_path / "p")
    healed = shortrt.heal(pruned, tmp_path / "h", texts=prose(), n_tokens=1024, seq_len=64, steps=3, batch=4,
                          precision="fp32", progress=False)
    assert healed.layer_map.healing["device"] == "cpu"


# ---- on a real GPU (skipped here) --------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("stream", [False, True])
def test_gpu_calibration_matches_the_cpu(dense, stream):
    cpu = shortrt.calibrate(dense, prose(), n_tokens=1024, seq_len=64, stream=stream, progress=False)
    gpu = shortrt.calibrate(dense, prose(), n_tokens=1024, seq_len=64, stream=stream, device="cuda",
                            backend="triton", progress=False)
    assert gpu.data["device"] == "cuda" and gpu.data["dtype"] == "bfloat16"
    for a, b in zip(cpu.bi, gpu.bi):
        assert abs(a - b) <= 0.02 * max(a, 1e-3) + 2e-3, (cpu.bi, gpu.bi)


@pytest.mark.gpu
@needs_gpu
def test_gpu_replace_and_heal_write_checkpoints_that_run(dense, tmp_path):
    lmap = LayerMap.from_removed(4, [1, 2], method="span")
    rep = shortrt.replace(dense, lmap, tmp_path / "r", texts=prose(), n_tokens=1024, seq_len=64, steps=20,
                          batch=4, device="cuda", progress=False)
    rec = rep.layer_map.replacement
    assert rec["device"] == "cuda" and rec["heldout_loss"] <= rec["heldout_loss_at_init"]
    pruned = shortrt.prune(dense, LayerMap.from_removed(4, [1], method="manual"), tmp_path / "p")
    healed = shortrt.heal(pruned, tmp_path / "h", texts=prose(), n_tokens=1024, seq_len=64, steps=20, batch=4,
                          device="cuda", progress=False)
    rec = healed.layer_map.healing
    assert rec["device"] == "cuda" and rec["precision"] == "bf16" and rec["kl_after"] <= rec["kl_before"]
    for model in (rep, healed):
        assert len(shortrt.generate(model, "once upon a time", max_new_tokens=4)) > 0
