"""The C++ safetensors reader and JSON parser (shortrt._C), against files the safetensors library writes,
hand-made corrupt files, and Python's json module. The reader must accept exactly what the safetensors
library (the oracle) accepts: the corpus in tests/data/safetensors_corpus/ and randomized files are run
through both."""
import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shortrt import _C

FormatError = _C.FormatError


# ---- helpers ------------------------------------------------------------------------------------

def raw_safetensors(path, header, data=b"", *, header_len=None):
    """Write a safetensors file by hand: `header` is a dict (dumped to JSON) or raw bytes; `header_len`
    overrides the length field so tests can make it lie."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return str(path)


def f32_entry(shape, begin, end=None):
    nbytes = 4 * int(np.prod(shape))
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + nbytes if end is None else end]}


@pytest.fixture
def two_tensor_file(tmp_path):
    """'a' F32 [2, 3] at bytes 0..24 and 'b' F32 [4] at 24..40 of the data section."""
    header = {"a": f32_entry([2, 3], 0), "b": f32_entry([4], 24), "__metadata__": {"format": "pt"}}
    data = np.arange(6, dtype=np.float32).tobytes() + np.arange(4, dtype=np.float32).tobytes()
    return raw_safetensors(tmp_path / "two.safetensors", header, data)


def open_and_touch(path):
    """Open a file and read every tensor's bytes (so a bad offset would fault here)."""
    f = _C.SafetensorsFile(path)
    return {name: f.numpy(name).tobytes() for name in f.names()}


# ---- reading what the safetensors library writes ------------------------------------------------

NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def test_numpy_written_dtypes_read_back_bit_exact(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for name, dt in NUMPY_DTYPES.items():
        if dt is np.bool_:
            tensors[name] = rng.integers(0, 2, size=(3, 5)).astype(np.bool_)
        elif np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            tensors[name] = rng.integers(info.min, info.max, size=(3, 5), dtype=dt, endpoint=True)
        else:
            tensors[name] = (rng.standard_normal((3, 5)) * 100).astype(dt)
    tensors["scalar"] = np.array(3.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "np", "note": "é ✓"})

    f = _C.SafetensorsFile(path)
    assert len(f) == len(tensors)
    assert sorted(f.names()) == sorted(tensors)
    assert f.metadata == {"format": "np", "note": "é ✓"}
    for name, expected in tensors.items():
        got = f.numpy(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name
        dtype_str = next((k for k, v in NUMPY_DTYPES.items() if v == expected.dtype), None) or "F32"
        assert f.info(name) == (dtype_str, expected.shape, expected.nbytes)


def test_torch_written_bf16_and_f16_read_back_bit_exact(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(7, 9).to(torch.bfloat16),
        "w.f16": torch.randn(4, 4).to(torch.float16),
        "w.f32": torch.randn(3, 2, 5),
        "ids": torch.arange(-5, 5, dtype=torch.int64),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    f = _C.SafetensorsFile(path)

    bf16 = f.numpy("w.bf16")
    assert f.info("w.bf16") == ("BF16", (7, 9), 7 * 9 * 2)
    assert bf16.dtype == np.uint16  # documented: BF16 comes back as its raw bits
    np.testing.assert_array_equal(bf16, tensors["w.bf16"].view(torch.int16).numpy().view(np.uint16))
    # Widening the bits gives the exact float values.
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, tensors["w.bf16"].float().numpy())
    np.testing.assert_array_equal(f.numpy("w.f16").view(np.uint16),
                                  tensors["w.f16"].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(f.numpy("w.f32"), tensors["w.f32"].numpy())
    np.testing.assert_array_equal(f.numpy("ids"), np.arange(-5, 5))


def test_names_follow_data_offsets(two_tensor_file, tmp_path):
    # Header order differs from data order: names() must follow the data.
    header = {"late": f32_entry([2], 8), "early": f32_entry([2], 0)}
    path = raw_safetensors(tmp_path / "order.safetensors", header, bytes(16))
    assert _C.SafetensorsFile(path).names() == ["early", "late"]
    assert _C.SafetensorsFile(two_tensor_file).names() == ["a", "b"]


def test_numpy_view_is_zero_copy_read_only_and_outlives_the_file_object(two_tensor_file):
    f = _C.SafetensorsFile(two_tensor_file)
    a = f.numpy("a")
    assert not a.flags.writeable and not a.flags.owndata
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    # The view points into the mapping at the tensor's file offset.
    header_size = f.header_size
    assert f.offset("a") == 8 + header_size and f.offset("b") == 8 + header_size + 24
    del f
    import gc

    gc.collect()
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_file_properties(two_tensor_file):
    import os

    f = _C.SafetensorsFile(two_tensor_file)
    assert f.path == two_tensor_file
    assert f.file_size == os.path.getsize(two_tensor_file)
    assert "a" in f and "zz" not in f
    assert f.metadata == {"format": "pt"}


# ---- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_of_a_transformers_model_matches_torch(tiny_llama):
    from safetensors.torch import load_file

    ckpt = _C.Checkpoint(str(tiny_llama))
    expected = load_file(str(tiny_llama / "model.safetensors"))
    assert sorted(ckpt.names()) == sorted(expected)
    assert "model.layers.3.mlp.down_proj.weight" in ckpt
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
    for name, t in expected.items():
        assert ckpt.info(name) == ("F32", tuple(t.shape), t.numel() * 4)
        np.testing.assert_array_equal(ckpt.numpy(name), t.numpy())
    assert ckpt.check_shape("model.embed_tokens.weight", [256, 64]) == ("F32", (256, 64), 256 * 64 * 4)
    with pytest.raises(FormatError, match=r"tensor 'model.norm.weight' in .*model.safetensors: "
                                          r"expected shape \[128\], found \[64\]"):
        ckpt.check_shape("model.norm.weight", [128])
    with pytest.raises(FormatError, match=r"tensor 'lm_head.weight' not found in checkpoint"):
        ckpt.info("lm_head.weight")  # tied embeddings: no separate head


def write_sharded(tmp_path, weight_map=None):
    from safetensors.numpy import save_file

    d = tmp_path / "sharded"
    d.mkdir()
    shard1 = {"x.weight": np.full((2, 2), 1.0, np.float32), "y.weight": np.arange(3, dtype=np.float32)}
    shard2 = {"z.weight": np.full((4,), 7, np.int32)}
    save_file(shard1, str(d / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(d / "model-00002-of-00002.safetensors"))
    if weight_map is None:
        weight_map = {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                      **{k: "model-00002-of-00002.safetensors" for k in shard2}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 40},
                                                                "weight_map": weight_map}))
    return d


def test_sharded_checkpoint_via_index(tmp_path):
    d = write_sharded(tmp_path)
    ckpt = _C.Checkpoint(str(d))
    assert ckpt.names() == ["x.weight", "y.weight", "z.weight"]
    assert len(ckpt) == 3 and ckpt.total_bytes == 16 + 12 + 16
    assert ckpt.file_of("z.weight").endswith("model-00002-of-00002.safetensors")
    np.testing.assert_array_equal(ckpt.numpy("z.weight"), np.full((4,), 7, np.int32))
    assert ckpt.info("y.weight") == ("F32", (3,), 12)


def test_index_naming_a_missing_shard(tmp_path):
    d = write_sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"names missing shard 'model-00002-of-00002.safetensors'"):
        _C.Checkpoint(str(d))


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    d = write_sharded(tmp_path, {"x.weight": "model-00002-of-00002.safetensors",
                                 "y.weight": "model-00001-of-00002.safetensors"})
    with pytest.raises(FormatError, match=r"lists tensor 'x.weight' in shard 'model-00002-of-00002"):
        _C.Checkpoint(str(d))


def test_index_shard_outside_the_directory(tmp_path):
    d = write_sharded(tmp_path, {"x.weight": "../evil.safetensors"})
    with pytest.raises(FormatError, match=r"shard name '../evil.safetensors' is not a plain file name"):
        _C.Checkpoint(str(d))


def test_index_that_is_not_json(tmp_path):
    d = write_sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(FormatError, match=r"model.safetensors.index.json: json: expected a string key, found end of input at offset 16"):
        _C.Checkpoint(str(d))


def test_same_tensor_in_two_files(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "dup"
    d.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(d / "a.safetensors"))
    save_file({"w": np.ones(2, np.float32), "v": np.ones(2, np.float32)}, str(d / "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors",
                                                                               "v": "b.safetensors"}}))
    with pytest.raises(FormatError, match=r"tensor 'w' is in both .*a.safetensors and .*b.safetensors"):
        _C.Checkpoint(str(d))


def test_loose_files_are_refused_but_a_file_path_is_accepted(tmp_path):
    """Weights are model.safetensors or an index's shards: loose files are not merged (the contract's
    file-set rule; the Python reader refuses them too)."""
    from safetensors.numpy import save_file

    d = tmp_path / "loose"
    d.mkdir()
    save_file({"b": np.ones(3, np.float16)}, str(d / "part-b.safetensors"))
    save_file({"a": np.arange(2, dtype=np.int8)}, str(d / "part-a.safetensors"))
    (d / "notes.txt").write_text("not a tensor file")
    with pytest.raises(FormatError, match=r"has no weights: expected model.safetensors .*found part-a.safetensors, "
                                          r"part-b.safetensors"):
        _C.Checkpoint(str(d))
    (d / "part-a.safetensors").rename(d / "model.safetensors")
    with pytest.raises(FormatError, match=r"stray weights file 'part-b.safetensors'"):
        _C.Checkpoint(str(d))
    one = _C.Checkpoint(str(d / "part-b.safetensors"))
    assert one.names() == ["b"] and one.total_bytes == 6
    view = one.numpy("b")
    del one
    np.testing.assert_array_equal(view, np.ones(3, np.float16))  # the view keeps the mapping alive


def test_format_error_is_a_value_error():
    assert issubclass(FormatError, ValueError)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FormatError, match=r"has no weights: expected model.safetensors"):
        _C.Checkpoint(str(tmp_path))


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        _C.Checkpoint(str(tmp_path / "nowhere"))


# ---- corrupt and hostile files ------------------------------------------------------------------

def test_missing_file_is_file_not_found(tmp_path):
    path = str(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"cannot open .*absent.safetensors: No such file"):
        _C.SafetensorsFile(path)


def test_missing_tensor(two_tensor_file):
    f = _C.SafetensorsFile(two_tensor_file)
    with pytest.raises(FormatError, match=r"tensor 'zz' not found in .*two.safetensors"):
        f.numpy("zz")
    with pytest.raises(FormatError, match=r"tensor 'zz' not found"):
        f.info("zz")


@pytest.mark.parametrize("cut, message", [
    (0, r"file is 0 bytes, too short"),
    (5, r"file is 5 bytes, too short"),
    (8, r"header length \d+ exceeds the 0 bytes"),
    (30, r"header length \d+ exceeds the 22 bytes"),
    (-1, r"data_offsets \[24, 40\] extend beyond the data section \(39 bytes"),
    (-20, r"data_offsets \[0, 24\] extend beyond the data section \(20 bytes"),
])
def test_truncated_file(two_tensor_file, tmp_path, cut, message):
    blob = open(two_tensor_file, "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[:cut] if cut >= 0 else blob[:len(blob) + cut])
    with pytest.raises(FormatError, match=message):
        _C.SafetensorsFile(str(path))


def test_error_names_the_file(tmp_path):
    path = raw_safetensors(tmp_path / "named.safetensors", {"a": f32_entry([2], 0)}, b"")
    with pytest.raises(FormatError, match=r"^.*named.safetensors: tensor 'a': "):
        _C.SafetensorsFile(path)


def test_header_length_lies(tmp_path):
    data = bytes(8)
    header = {"a": f32_entry([2], 0)}
    blob_len = len(json.dumps(header))
    path = raw_safetensors(tmp_path / "big.safetensors", header, data, header_len=blob_len + 9)
    with pytest.raises(FormatError, match=rf"header length {blob_len + 9} exceeds the {blob_len + 8} bytes"):
        _C.SafetensorsFile(path)
    path = raw_safetensors(tmp_path / "huge.safetensors", header, data, header_len=2**60)
    with pytest.raises(FormatError, match=r"header length 1152921504606846976 is larger than the limit of "
                                          r"100000000 bytes"):
        _C.SafetensorsFile(path)
    # Too short a length cuts the JSON mid-document.
    path = raw_safetensors(tmp_path / "short.safetensors", header, data, header_len=blob_len - 3)
    with pytest.raises(FormatError, match=r"header is not valid JSON \(expected ',' or '\]' in array, found end "
                                          r"of header at header byte \d+\)"):
        _C.SafetensorsFile(path)


def test_header_length_short_of_the_padding_is_refused(tmp_path):
    """The bug that loaded garbage: the writer padded the header with spaces, the length field stops a few
    bytes short, so the leftover spaces start the data section and every tensor would read shifted."""
    header = json.dumps({"a": f32_entry([2], 0)}).encode() + b" " * 6
    data = np.array([1.5, 2.5], np.float32).tobytes()
    path = raw_safetensors(tmp_path / "short.safetensors", header, data, header_len=len(header) - 3)
    with pytest.raises(FormatError, match=r"short.safetensors: data bytes \[8, 11\] after the last tensor, 'a', "
                                          r"belong to no tensor \(wrong header length"):
        _C.SafetensorsFile(path)
    good = raw_safetensors(tmp_path / "good.safetensors", header, data)
    np.testing.assert_array_equal(_C.SafetensorsFile(good).numpy("a"), [1.5, 2.5])


@pytest.mark.parametrize("header, data_len, message", [
    ({"a": f32_entry([2], 0, 16)}, 8, r"tensor 'a': data_offsets \[0, 16\] extend beyond the data section \(8 bytes"),
    ({"a": f32_entry([2], 8, 0)}, 8, r"tensor 'a': data_offsets \[8, 0\] has begin > end"),
    ({"a": f32_entry([3], 0, 8)}, 8, r"tensor 'a': data_offsets \[0, 8\] span 8 bytes, but shape \[3\] of F32 needs 12"),
    ({"a": f32_entry([2], 0), "b": f32_entry([2], 4)}, 12, r"tensors 'a' and 'b' overlap"),
    ({"a": f32_entry([4], 0), "b": f32_entry([1], 4)}, 16, r"tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F8_E9M9", "shape": [2], "data_offsets": [0, 2]}}, 2, r"tensor 'a': unknown dtype 'F8_E9M9'"),
    ({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, 8, r"tensor 'a': 'dtype' is a number, not a string"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, r"tensor 'a': missing 'dtype'"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, r"tensor 'a': missing 'shape'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, r"tensor 'a': missing 'data_offsets'"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8, r"'shape' is a number, not an array"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}}, 10,
     r"shape dim 0 is 2.5, not a non-negative integer"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, r"shape dim 0 is 2.0, not a non-negative"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8,
     r"shape dim 0 is a string, not a non-negative integer"),
    ({"a": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, 8, r"shape dim 1 is -1, not a non-negative"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8,
     r"shape \[1099511627776, 1099511627776\] is too large"),
    ({"a": {"dtype": "F64", "shape": [2**31, 2**31], "data_offsets": [0, 8]}}, 8, r"is too large"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0, r"is too large"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, r"'data_offsets' has 1 element, not two"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, r"data_offsets\[0\] is -8, not a non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e300]}}, 8, r"data_offsets\[1\] is 1e\+300, not a"),
    # serde reads a struct from an array too, so this is [dtype, shape, data_offsets] with dtype 1.
    ({"a": [1, 2]}, 8, r"tensor 'a': 'dtype' is a number, not a string"),
    ({"a": "F32"}, 8, r"tensor 'a': entry is a string, not an object"),
    ({"__metadata__": {"format": 1}}, 0, r"__metadata__ value for 'format' is a number, not a string"),
    ({"__metadata__": ["x"]}, 0, r"__metadata__ is an array, not a JSON object of strings"),
    ([1, 2, 3], 0, r"header is an array, not a JSON object"),
    ({"a": f32_entry([1], 0), "b": f32_entry([1], 8)}, 12,
     r"data bytes \[4, 8\] belong to no tensor \(a gap between 'a' and 'b'\)"),
    ({"a": f32_entry([1], 4)}, 8, r"data bytes \[0, 4\] belong to no tensor \(the first tensor, 'a', must begin at 0\)"),
    ({"a": f32_entry([1], 0)}, 8, r"data bytes \[4, 8\] after the last tensor, 'a', belong to no tensor"),
    ({}, 3, r"data bytes \[0, 3\] after the header belong to no tensor"),
    ({"a": f32_entry([2], 0), "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, 8,
     r"tensors 'a' and 'e' overlap"),
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, r"shape \[3\] of F4 is 12 bits, not a whole"),
])
def test_corrupt_header(tmp_path, header, data_len, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(data_len))
    with pytest.raises(FormatError, match=message):
        _C.SafetensorsFile(path)


@pytest.mark.parametrize("blob, message", [
    (b"\xff\xfe\x00garbage", r"header is not valid UTF-8 \(byte 0xff at header byte 0\)"),
    (b'{} trailing', r"header is not valid JSON \(unexpected 't' after the header object at header byte 3\)"),
    # A repeated tensor name is allowed (the last entry wins), but every entry must be well formed.
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', r"tensor 'a': missing 'dtype'"),
    (b'{"__metadata__": {}, "__metadata__": {}}', r"__metadata__ appears twice"),
    (b'{"a\\nb": 1}', r"tensor 'a\\x0ab': entry is a number"),  # names are escaped: messages stay one line
])
def test_garbage_header_bytes(tmp_path, blob, message):
    path = raw_safetensors(tmp_path / "garbage.safetensors", blob, bytes(4))
    with pytest.raises(FormatError, match=message):
        _C.SafetensorsFile(path)


def test_valid_edge_cases(tmp_path):
    # Header padded with spaces (as the safetensors library does), an empty tensor where one tensor ends
    # and the next begins, and a scalar are fine. (An empty tensor inside another's bytes and trailing
    # bytes after the last tensor used to be accepted too; the library refuses both, and so do we now.)
    header = {"a": f32_entry([2], 0), "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
              "s": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]}}
    blob = json.dumps(header).encode() + b"   "
    data = np.array([1.5, 2.5], np.float32).tobytes() + np.array(-7, np.int64).tobytes()
    got = open_and_touch(raw_safetensors(tmp_path / "edge.safetensors", blob, data))
    assert got["e"] == b""
    f = _C.SafetensorsFile(str(tmp_path / "edge.safetensors"))
    assert f.numpy("s").shape == () and int(f.numpy("s")) == -7
    assert f.numpy("e").shape == (0, 3)
    assert f.info("s") == ("I64", (), 8)
    empty = _C.SafetensorsFile(raw_safetensors(tmp_path / "none.safetensors", {}, b""))
    assert len(empty) == 0 and empty.names() == []


def test_fuzzed_files_raise_format_error_or_load(two_tensor_file, tmp_path):
    """Random byte flips and truncations of a valid file: each either loads (with every tensor inside
    the file) or raises FormatError -- never a crash or another exception."""
    original = open(two_tensor_file, "rb").read()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    path = tmp_path / "fuzz.safetensors"
    for case in range(400):
        blob = bytearray(original)
        kind = case % 4
        if kind == 3:
            blob = blob[:rng.randrange(len(blob))]
        else:
            # Half the cases hit the length field and the header, where the parsing happens; the
            # rest the data, which must still load.
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(header_end) if kind < 2 else rng.randrange(header_end, len(blob))
                blob[pos] = rng.choice([rng.randrange(256), ord(rng.choice('{}[]",:0123456789-e. '))])
        path.write_bytes(bytes(blob))
        try:
            tensors = open_and_touch(str(path))
        except FormatError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        f = _C.SafetensorsFile(str(path))
        for name in tensors:
            assert f.offset(name) + f.info(name)[2] <= len(blob)
    assert outcomes["ok"] > 100 and outcomes["error"] > 150, outcomes


# ---- differential: the C++ reader against the safetensors library --------------------------------

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "safetensors_corpus"
REGRESSIONS = ROOT / "fuzz" / "regressions"  # inputs the fuzzer once crashed on (fuzz/run.sh)
INT64_MAX = 2**63 - 1


def library_read(blob):
    """What the safetensors library makes of a file image: {name: (dtype, shape, bytes)}, or None if it
    refuses it."""
    import safetensors

    try:
        return {name: (t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in safetensors.deserialize(blob)}
    except Exception:  # SafetensorError, and whatever else it raises for garbage
        return None


def our_read_bytes(blob):
    """The same from shortrt's in-memory parser: (contents or None, error message or None)."""
    try:
        got = _C.parse_safetensors(blob, "<fuzz>")
    except FormatError as exc:
        return None, str(exc)
    start = 8 + got["header_size"]
    return {name: (dtype, list(shape), blob[start + begin:start + end])
            for name, dtype, shape, begin, end in got["tensors"]}, None


def our_read_path(path):
    """The same from the file reader (mmap), reading every tensor through its numpy view."""
    try:
        f = _C.SafetensorsFile(str(path))
    except (FormatError, OSError) as exc:
        return None, str(exc)
    # (numpy refuses some empty shapes, e.g. [0, 2^40, 2^40]; their bytes are b"" anyway.)
    return {name: (f.info(name)[0], list(f.info(name)[1]), f.numpy(name).tobytes() if f.info(name)[2] else b"")
            for name in f.names()}, None


def known_difference(lib, error):
    """The one deliberate difference: the library allows a dim above 2^63 - 1 in an empty tensor
    ([2^64 - 1, 0]); shortrt's shapes are int64, so it refuses the file."""
    return (lib is not None and error is not None and "beyond the 2^63 - 1 shortrt supports" in error
            and any(d > INT64_MAX for _, shape, _ in lib.values() for d in shape))


def assert_agree(blob, lib, ours, error, what):
    if known_difference(lib, error):
        return
    if (lib is None) != (ours is None):
        verdict = "accepts" if lib is not None else "rejects"
        pytest.fail(f"{what}: the safetensors library {verdict} it, shortrt {'does not' if ours is None else 'does'}"
                    f" ({error}); file starts {blob[:160]!r}")
    assert ours == lib, what
    if error is not None:
        assert "\n" not in error, error


def corpus_files():
    files = sorted(CORPUS.glob("*.safetensors"))
    if REGRESSIONS.is_dir():
        files += sorted(p for p in REGRESSIONS.iterdir() if p.is_file() and not p.name.startswith("."))
    return files


def test_corpus_is_complete_and_current():
    assert len(list(CORPUS.glob("*.safetensors"))) >= 100
    gen = ROOT / "tests" / "data" / "make_safetensors_corpus.py"
    done = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the files match the generator and the library's verdicts


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_file_agrees_with_the_library(path):
    """Every corpus file (and fuzzer regression) is accepted by the C++ reader iff the library accepts it,
    and then read to the same tensors; a refusal is one line naming the file."""
    from safetensors import safe_open

    blob = path.read_bytes()
    lib = library_read(blob)
    try:  # the library's file reader takes the same decision as its bytes reader
        with safe_open(str(path), framework="numpy") as f:
            lib_keys = sorted(f.keys())
    except Exception:
        lib_keys = None
    assert (lib_keys is None) == (lib is None) and (lib is None or lib_keys == sorted(lib)), path.name
    if path.parent == CORPUS:
        expected = "rejects" if path.name.startswith("bad-") else "accepts"
        assert (lib is None) == (expected == "rejects"), f"the library no longer {expected} {path.name}"
    ours, error = our_read_path(path)
    assert_agree(blob, lib, ours, error, path.name)
    assert our_read_bytes(blob)[0] == ours  # both C++ entry points run the same code
    if error is not None:
        assert str(path) in error, error
    if path.name.startswith("diff-"):
        assert known_difference(lib, error), error


def mutated_files(seed, count):
    """Random valid files (every dtype, shuffled header order, padding, metadata), most then mutated:
    header bytes overwritten, JSON tokens inserted or bytes deleted (the length field kept in step), the
    length field nudged alone, the data cut or extended, numbers and dtype names swapped, bits flipped."""
    bits = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
            "BOOL": 8, "U16": 16, "U32": 32, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E5M2": 8,
            "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64}
    tokens = ['{', '}', '[', ']', '"', ',', ':', '0', '1', '-', '.', 'e', ' ', '\\', 'null', '"F32"', '"dtype"',
              '"shape"', '"data_offsets"', '"__metadata__"', '-0', '2.0', '1e400', '18446744073709551616',
              '\\ud83d', '\x00', '\xff', '\t']
    numbers = ['0', '1', '4', '8', '-0', '2.0', '1e1', '18446744073709551615', '9223372036854775808']
    rng = random.Random(seed)

    def valid():
        header, offset = {}, 0
        for i in range(rng.randint(0, 4)):
            dtype = rng.choice(list(bits))
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
            nbits = int(np.prod(shape, dtype=np.int64)) * bits[dtype]
            if nbits % 8:
                shape.append(8 // math.gcd(8, bits[dtype]))
                nbits *= shape[-1]
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbits // 8]}
            offset += nbits // 8
        items = list(header.items())
        rng.shuffle(items)
        header = dict(items)
        if rng.random() < 0.5:
            header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=rng.choice([(",", ":"), (", ", ": ")])).encode()
        text += b" " * rng.choice([0, 0, 1, 3, 7])
        return bytearray(struct.pack("<Q", len(text)) + text + rng.randbytes(offset))

    def set_header(b, text):
        b[8:8 + n_of(b)] = text
        b[:8] = struct.pack("<Q", len(text))

    def n_of(b):
        return min(struct.unpack("<Q", b[:8])[0], len(b) - 8)

    for _ in range(count):
        b = valid()
        for _ in range(rng.randint(1, 3) if rng.random() < 0.9 else 0):
            if len(b) < 8:  # cut inside the length field: nothing more to mutate
                break
            n, op = n_of(b), rng.randrange(8)
            header = bytes(b[8:8 + n])
            if op == 0 and n:
                pos = rng.randrange(n)
                byte = rng.randrange(256) if rng.random() < 0.3 else ord(rng.choice('{}[]",:0123456789-.eE '))
                set_header(b, header[:pos] + bytes([byte]) + header[pos + 1:])
            elif op == 1:
                pos = rng.randrange(n + 1)
                set_header(b, header[:pos] + rng.choice(tokens).encode("latin1") + header[pos:])
            elif op == 2 and n:
                pos = rng.randrange(n)
                set_header(b, header[:pos] + header[pos + rng.randint(1, 3):])
            elif op == 3:
                b[:8] = struct.pack("<Q", max(0, n + rng.choice([-3, -2, -1, 1, 2, 3, 8])))
            elif op == 4:
                if rng.random() < 0.5:
                    del b[rng.randrange(len(b)):]
                else:
                    b += bytes(rng.randint(1, 4))
            elif op == 5:
                spans = [(i, j) for i, j in _digit_runs(header)]
                if spans:
                    i, j = rng.choice(spans)
                    set_header(b, header[:i] + rng.choice(numbers + [str(int(header[i:j]) + 1)]).encode() + header[j:])
            elif op == 6:
                names = [d for d in bits if f'"{d}"'.encode() in header]
                if names:
                    new = rng.choice(list(bits) + ["f32", "XX"])
                    set_header(b, header.replace(f'"{names[0]}"'.encode(), f'"{new}"'.encode(), 1))
            elif len(b):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        yield bytes(b)


def _digit_runs(text):
    i = 0
    while i < len(text):
        if 48 <= text[i] <= 57:
            j = i
            while j < len(text) and 48 <= text[j] <= 57:
                j += 1
            yield i, j
            i = j
        else:
            i += 1


def test_randomized_files_agree_with_the_library():
    """4000 random files, fixed seed, compared in memory: same verdict, same tensors, bit for bit."""
    accepted = rejected = 0
    for i, blob in enumerate(mutated_files(seed=2024, count=4000)):
        lib = library_read(blob)
        ours, error = our_read_bytes(blob)
        assert_agree(blob, lib, ours, error, f"random file {i}")
        accepted += ours is not None
        rejected += ours is None
    assert accepted > 400 and rejected > 2000, (accepted, rejected)


def test_every_dtype_reads_back(tmp_path):
    f = _C.SafetensorsFile(str(CORPUS / "ok-every-dtype.safetensors"))
    assert len(f) == 22
    assert f.info("F4") == ("F4", (4,), 2) and f.info("F6_E3M2") == ("F6_E3M2", (4,), 3)
    assert f.numpy("F4").shape == (2,) and f.numpy("F4").dtype == np.uint8  # packed bytes
    assert f.numpy("F8_E4M3").shape == (4,) and f.numpy("F8_E4M3").dtype == np.uint8  # raw bits
    assert f.numpy("C64").dtype == np.complex64 and f.numpy("C64").shape == (4,)


def test_empty_tensors_with_huge_dims(tmp_path):
    # The library accepts them (the element count is 0); numpy cannot hold every such shape.
    f = _C.SafetensorsFile(str(CORPUS / "ok-zero-dim-first-huge-rest.safetensors"))
    assert f.info("a") == ("F32", (0, 2**40, 2**40), 0)
    with pytest.raises(FormatError, match=r"tensor 'a' has shape \[0, 1099511627776, 1099511627776\], too large "
                                          r"for a numpy array"):
        f.numpy("a")
    f = _C.SafetensorsFile(str(CORPUS / "ok-zero-dim-after-2-pow-63.safetensors"))
    assert f.info("a") == ("U8", (2**32, 2**31, 0), 0)  # the dims before the 0 multiply past int64


# ---- paths that are not regular files ----------------------------------------------------------

def test_fifo_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes; the reader must refuse it at once. Run in a
    child process so that a regression fails on the timeout instead of hanging the suite."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    code = ("import sys\nfrom shortrt import _C\n"
            "for make in (_C.SafetensorsFile, _C.Checkpoint):\n"
            "    for path in sys.argv[1:]:\n"
            "        try:\n            make(path)\n        except Exception as exc:\n"
            "            print(type(exc).__name__, exc)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(_C.__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code, str(fifo), str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=env)
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout + done.stderr
    want = f"FormatError cannot open {fifo}: it is a FIFO (named pipe), not a safetensors file"
    assert lines[0] == lines[3] == want, lines  # the file, and the checkpoint directory holding it
    assert lines[1].startswith("IsADirectoryError"), lines
    assert lines[2] == f"FormatError checkpoint {fifo} is neither a directory nor a file", lines


def test_directory_and_device_are_refused(tmp_path):
    d = tmp_path / "model.safetensors"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"cannot open {d}: it is a directory, not a safetensors file$"):
        _C.SafetensorsFile(str(d))
    with pytest.raises(IsADirectoryError, match=rf"cannot open {d}: it is a directory, not a safetensors file$"):
        _C.Checkpoint(str(tmp_path))
    with pytest.raises(FormatError, match=r"^cannot open /dev/null: it is a character device, not a safetensors"):
        _C.SafetensorsFile("/dev/null")


def test_engine_names_a_directory_in_place_of_the_weights(tiny_llama):
    import shutil

    from shortrt.engine import Engine

    weights = tiny_llama / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(IsADirectoryError, match=r"model.safetensors: it is a directory, not a safetensors file"):
        Engine(tiny_llama)
    shutil.rmtree(weights)


# ---- non-finite weights --------------------------------------------------------------------------

def poisoned_copy(src_dir, dst_dir, edits):
    """A copy of a checkpoint with some weights edited: edits = {name: (dtype or None, function)}."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src_dir, dst_dir)
    tensors = load_file(str(dst_dir / "model.safetensors"))
    for name, (dtype, edit) in edits.items():
        t = tensors[name].clone() if dtype is None else tensors[name].to(dtype)
        edit(t)
        tensors[name] = t
    save_file(tensors, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    return dst_dir


def test_nan_weight_is_an_error_naming_the_tensor(tiny_llama, tmp_path, monkeypatch):
    import torch

    from shortrt.engine import Engine
    from shortrt.errors import CheckpointError

    monkeypatch.delenv("SHORTRT_ALLOW_NONFINITE", raising=False)
    down = "model.layers.3.mlp.down_proj.weight"  # [64, 128]: a matrix, fp32
    bad = poisoned_copy(tiny_llama, tmp_path / "nan", {down: (None, lambda t: t.view(-1).__setitem__(5, float("nan")))})
    with pytest.raises(CheckpointError, match=rf"tensor '{down}' in .*model.safetensors holds NaN/Inf values "
                                              r"\(1 of 8192, the first at element 5: nan\); set "
                                              r"SHORTRT_ALLOW_NONFINITE=1 to load it anyway$"):
        Engine(bad)
    # bf16 weights of a fused q|k|v matrix, and a norm vector.
    q = "model.layers.0.self_attn.q_proj.weight"
    bad = poisoned_copy(tiny_llama, tmp_path / "inf", {q: (torch.bfloat16, lambda t: t.view(-1).__setitem__(70, -float("inf")))})
    with pytest.raises(CheckpointError, match=rf"tensor '{q}' .* \(1 of 4096, the first at element 70: -inf\)"):
        Engine(bad, dtype="int8")
    bad = poisoned_copy(tiny_llama, tmp_path / "norm", {"model.norm.weight": (None, lambda t: t.fill_(float("inf")))})
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' .* \(64 of 64, the first at element 0: inf\)"):
        Engine(bad)


def test_nan_weight_loads_with_a_warning_when_allowed(tiny_llama, tmp_path, monkeypatch, capfd):
    from shortrt.engine import Engine

    down = "model.layers.3.mlp.down_proj.weight"
    bad = poisoned_copy(tiny_llama, tmp_path / "nan", {down: (None, lambda t: t.view(-1)[:3].fill_(float("nan")))})
    monkeypatch.setenv("SHORTRT_ALLOW_NONFINITE", "1")
    Engine(bad, max_seq=16)
    err = capfd.readouterr().err
    assert (f"shortrt: warning: tensor '{down}' in {bad / 'model.safetensors'} holds NaN/Inf values (3 of 8192, "
            "the first at element 0: nan); loading it anyway (SHORTRT_ALLOW_NONFINITE=1)") in err
    monkeypatch.setenv("SHORTRT_ALLOW_NONFINITE", "0")  # only "1" opts in
    with pytest.raises(ValueError, match="holds NaN/Inf values"):
        Engine(bad, max_seq=16)


# ---- the JSON parser ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "null", "true", "false", "0", "-0", "42", "-17", "3.25", "1e3", "1E+2", "-2.5e-3", '""', '"abc"',
    "[]", "{}", "[1, [2, [3, []]]]", ' \t\n\r{"a" : [ true , null ] , "b":{"c":"d"}} \n',
    '{"model_type": "llama", "rope_theta": 100000.0, "num_hidden_layers": 30, "tie_word_embeddings": true}',
])
def test_json_valid_documents_match_python(text):
    assert _C.parse_json(text) == json.loads(text)


def test_json_keeps_key_order_and_types():
    value = _C.parse_json('{"z": 1, "a": 2.0, "m": [1, 1.5]}')
    assert list(value) == ["z", "a", "m"]
    assert type(value["z"]) is int and type(value["a"]) is float
    assert [type(x) for x in value["m"]] == [int, float]


@pytest.mark.parametrize("text, expected", [
    (r'"\"\\\/\b\f\n\r\t"', '"\\/\b\f\n\r\t'),
    (r'"\u0041\u00e9\u4e2d"', "Aé中"),
    (r'"\ud83d\ude00!"', "😀!"),
    (r'"\uD834\uDD1E"', "𝄞"),
    ('"é中😀"', "é中😀"),  # raw UTF-8 passes through
    (r'"\u0000x"', "\x00x"),
])
def test_json_string_escapes(text, expected):
    assert _C.parse_json(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", r"json: unexpected end of input at offset 0"),
    ("   ", r"json: unexpected end of input at offset 3"),
    ("[1, 2", r"json: expected ',' or '\]' in array, found end of input at offset 5"),
    ("[1,]", r"json: unexpected '\]' at offset 3"),
    ('{"a": 1,}', r"json: expected a string key, found '}' at offset 8"),
    ("{a: 1}", r"json: expected a string key, found 'a' at offset 1"),
    ('{"a" 1}', r"json: expected ':' after object key, found '1' at offset 5"),
    ("{'a': 1}", r"expected a string key, found ''' at offset 1"),
    ("[1] x", r"json: unexpected 'x' after the document at offset 4"),
    ("{} {}", r"json: unexpected '\{' after the document at offset 3"),
    ("01", r"json: invalid number: leading zero at offset 0"),
    ("-", r"json: invalid number: expected a digit at offset 1"),
    ("1.", r"json: invalid number: expected a digit after '.' at offset 2"),
    (".5", r"json: unexpected '\.' at offset 0"),
    ("1e", r"json: invalid number: expected a digit in the exponent at offset 2"),
    ("+1", r"json: unexpected '\+' at offset 0"),
    ("1e400", r"json: number out of range at offset 0"),
    ("[1.8e308]", r"json: number out of range at offset 1"),
    ("-0.00001e315", r"json: number out of range at offset 0"),
    ("NaN", r"json: unexpected 'N' at offset 0"),
    ("Infinity", r"json: unexpected 'I' at offset 0"),
    ("tru", r"json: invalid literal \(expected 'true'\) at offset 0"),
    ("nul", r"json: invalid literal \(expected 'null'\)"),
    ('"abc', r"json: unterminated string at offset 0"),
    ('"a\tb"', r"json: unescaped control character in string at offset 2"),
    (r'"\x41"', r"json: invalid escape '\\x' at offset 1"),
    (r'"\u12"', r"json: truncated \\u escape"),
    (r'"\u12G4"', r"json: invalid hex digit in \\u escape at offset 5"),
    (r'"\ud83d"', r"json: unpaired high surrogate in \\u escape at offset 1"),
    (r'"\ud83d\u0041"', r"json: unpaired high surrogate"),
    (r'"\ude00"', r"json: unpaired low surrogate in \\u escape at offset 1"),
    ('{"a": 1, "b": 2, "a": 3}', r"json: duplicate key 'a' at offset 17"),
    ("[1] // comment", r"unexpected '/' after the document"),
])
def test_json_rejects_malformed_documents(text, message):
    with pytest.raises(FormatError, match=message):
        _C.parse_json(text)


@pytest.mark.parametrize("blob", [b'"\xff"', b'"\xc3"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"',
                                  b'"\xe2\x82"'])
def test_json_rejects_invalid_utf8(blob):
    with pytest.raises(FormatError, match=r"json: invalid UTF-8 in string at offset 1"):
        _C.parse_json(blob)


def test_json_duplicate_key_in_a_large_object():
    text = "{" + ", ".join(f'"k{i}": {i}' for i in range(20)) + ', "k7": 0}'
    offset = text.rindex('"k7"')
    with pytest.raises(FormatError, match=rf"json: duplicate key 'k7' at offset {offset}$"):
        _C.parse_json(text)


def test_json_nesting_limit():
    assert _C.parse_json("[" * 128 + "]" * 128) is not None
    with pytest.raises(FormatError, match=r"json: nesting deeper than 128 levels at offset 128"):
        _C.parse_json("[" * 129 + "]" * 129)
    # Far deeper input fails the same way instead of overflowing the stack.
    with pytest.raises(FormatError, match=r"nesting deeper than 128"):
        _C.parse_json('{"a":' * 100000)


@pytest.mark.parametrize("text, expected", [
    ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -2**63),
    ("9007199254740993", 2**53 + 1),  # exact beyond double precision
    ("9223372036854775808", 9.223372036854775808e18),  # past int64: kept as a double
    ("-0.0", -0.0), ("1.7976931348623157e308", 1.7976931348623157e308), ("5e-324", 5e-324),
    ("0.1", 0.1), ("123456.789e-3", 123.456789),
    ("1e-400", 0.0), ("-1e-400", -0.0), ("0.0001e-320", 0.0),  # underflow rounds to zero, like Python
    ("1000000000000000e-330", 1e-315),
])
def test_json_numbers(text, expected):
    got = _C.parse_json(text)
    # repr is exact for floats (and tells -0.0 from 0.0) and for ints.
    assert repr(got) == repr(expected) and type(got) is type(expected)


def test_json_agrees_with_python_on_mutated_documents():
    """Mutated JSON: whatever our strict parser accepts, Python's json reads to the same value."""
    base = json.dumps({"a": [1, 2.5, -3e-2, "x\u00e9\\n", None, True], "b": {"c": {"d": []}}, "e": "\ud83d\ude00"})
    rng = random.Random(7)
    accepted = 0
    for _ in range(500):
        chars = list(base)
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.randrange(3), rng.randrange(len(chars))
            if op == 0:
                del chars[pos]
            elif op == 1:
                chars.insert(pos, rng.choice('{}[]",:0-e.\\u '))
            else:
                chars[pos] = rng.choice('{}[]",:01-e.\\ ')
        text = "".join(chars)
        try:
            ours = _C.parse_json(text)
        except FormatError:
            continue
        accepted += 1
        assert ours == json.loads(text), text
    assert accepted > 20
