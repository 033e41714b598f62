"""shortrt.gguf_export.prune_gguf: blocks removed and renumbered, everything else copied bit for bit."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from shortrt.gguf_export import prune_gguf  # noqa: E402


def write_tiny_gguf(path, n_blocks=4):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_blocks)
    w.add_context_length(128)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((3, 8), dtype=np.float32)}
    for i in range(n_blocks):
        tensors[f"blk.{i}.attn_q.weight"] = np.full((8, 8), i, dtype=np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.full((8,), 10 + i, dtype=np.float32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_blocks_are_removed_and_renumbered(tmp_path):
    src, dst = tmp_path / "tiny.gguf", tmp_path / "pruned.gguf"
    tensors = write_tiny_gguf(src)
    prune_gguf(src, [0, 2, 3], dst)
    r = gguf.GGUFReader(str(dst))
    assert int(r.fields["llama.block_count"].contents()) == 3
    assert r.fields["general.name"].contents() == "tiny"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    got = {t.name: np.array(t.data) for t in r.tensors}
    assert sorted(got) == sorted(["token_embd.weight"] + [f"blk.{i}.{n}" for i in range(3)
                                                          for n in ("attn_q.weight", "ffn_norm.weight")])
    np.testing.assert_array_equal(got["token_embd.weight"], tensors["token_embd.weight"])
    for new, old in enumerate([0, 2, 3]):
        np.testing.assert_array_equal(got[f"blk.{new}.attn_q.weight"], tensors[f"blk.{old}.attn_q.weight"])
        np.testing.assert_array_equal(got[f"blk.{new}.ffn_norm.weight"], tensors[f"blk.{old}.ffn_norm.weight"])


def test_bad_requests_are_refused(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    with pytest.raises(ValueError, match="out of range"):
        prune_gguf(src, [0, 9], tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="at least one block"):
        prune_gguf(src, [], tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="duplicate"):
        prune_gguf(src, [1, 1], tmp_path / "c.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"user data")
    with pytest.raises(FileExistsError):
        prune_gguf(src, [0], tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"user data"
