"""The C++ safetensors reader and JSON parser (shortrt._C), against files the safetensors library writes,
hand-made corrupt files, and Python's json module."""
import json
import random
import struct

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
    with pytest.raises(FormatError, match=r"header length 1152921504606846976 is larger than the 100 MB limit"):
        _C.SafetensorsFile(path)
    # Too short a length cuts the JSON mid-document.
    path = raw_safetensors(tmp_path / "short.safetensors", header, data, header_len=blob_len - 3)
    with pytest.raises(FormatError, match=r"header is not valid JSON \(json: "):
        _C.SafetensorsFile(path)


@pytest.mark.parametrize("header, data_len, message", [
    ({"a": f32_entry([2], 0, 16)}, 8, r"tensor 'a': data_offsets \[0, 16\] extend beyond the data section \(8 bytes"),
    ({"a": f32_entry([2], 8, 0)}, 8, r"tensor 'a': data_offsets \[8, 0\] has begin > end"),
    ({"a": f32_entry([3], 0, 8)}, 8, r"tensor 'a': data_offsets \[0, 8\] span 8 bytes, but shape \[3\] of F32 needs 12"),
    ({"a": f32_entry([2], 0), "b": f32_entry([2], 4)}, 12, r"tensors 'a' and 'b' overlap"),
    ({"a": f32_entry([4], 0), "b": f32_entry([1], 4)}, 16, r"tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F8_E9M9", "shape": [2], "data_offsets": [0, 2]}}, 2, r"tensor 'a': unknown dtype 'F8_E9M9'"),
    ({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, 8, r"tensor 'a': 'dtype' is not a string"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, r"tensor 'a': missing 'dtype'"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, r"tensor 'a': missing 'shape'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, r"tensor 'a': missing 'data_offsets'"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8, r"'shape' is not an array"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}}, 10, r"shape dim 0 is not an integer"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, r"shape dim 0 is not an integer"),
    ({"a": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, 8, r"shape dim 1 is negative \(-1\)"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8,
     r"shape \[1099511627776, 1099511627776\] is too large"),
    ({"a": {"dtype": "F64", "shape": [2**31, 2**31], "data_offsets": [0, 8]}}, 8, r"is too large"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0, r"is too large"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, r"'data_offsets' is not an array of two"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, r"data_offsets\[0\] is negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e300]}}, 8, r"data_offsets\[1\] is not an integer"),
    ({"a": [1, 2]}, 8, r"tensor 'a': entry is a JSON array, not an object"),
    ({"__metadata__": {"format": 1}}, 0, r"__metadata__ value for 'format' is a number, not a string"),
    ({"__metadata__": ["x"]}, 0, r"__metadata__ is not a JSON object"),
    ([1, 2, 3], 0, r"header is a JSON array, not an object"),
])
def test_corrupt_header(tmp_path, header, data_len, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(data_len))
    with pytest.raises(FormatError, match=message):
        _C.SafetensorsFile(path)


@pytest.mark.parametrize("blob, message", [
    (b"\xff\xfe\x00garbage", r"header is not valid JSON \(json: unexpected byte 0xff at offset 0\)"),
    (b'{"a": 1} trailing', r"unexpected 't' after the document"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', r"duplicate key 'a'"),
    (b"", r"unexpected end of input at offset 0"),
])
def test_garbage_header_bytes(tmp_path, blob, message):
    path = raw_safetensors(tmp_path / "garbage.safetensors", blob, bytes(4))
    with pytest.raises(FormatError, match=message):
        _C.SafetensorsFile(path)


def test_valid_edge_cases(tmp_path):
    # Header padded with spaces (as the safetensors library does), an empty tensor inside another's
    # bytes (it occupies none), a scalar, and trailing bytes after the last tensor are all fine.
    header = {"a": f32_entry([2], 0), "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
              "s": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]}}
    blob = json.dumps(header).encode() + b"   "
    data = np.array([1.5, 2.5], np.float32).tobytes() + np.array(-7, np.int64).tobytes() + b"tail"
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
