"""`shortrt demo` runs the whole path (calibrate, prune, runtime, perplexity) on a tiny model."""
import json
import subprocess
import sys

from runtime_models import make_tiny


def test_demo_on_a_tiny_model(tmp_path):
    ckpt, _ = make_tiny(tmp_path / "tiny", tokenizer=True, num_hidden_layers=8, vocab_size=300)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, "-m", "shortrt", "demo", str(ckpt), "--tokens", "512", "--ppl-tokens", "512",
         "--new-tokens", "4", "--train-tokens", "1024", "--replace-steps", "3", "--heal-seconds", "2",
         "--out", str(work)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "Pruning 2 of 8 layers (shortgpt)" in out
    assert (work / "layer_scores.png").stat().st_size > 1000
    assert (work / "similarity.png").stat().st_size > 1000
    pruned = json.loads((work / "shortgpt-p2" / "shortrt.json").read_text())
    assert len(pruned["layers"]) == 6
    # the comparison table: dense runs 8 layers, pruned 6, and the KV cache shrinks to 6/8
    assert "pruned -2 vs dense" in out and "KV cache 0.750x (6/8 layers)" in out
    # the span replaced by one layer and healed: 7 layers run, and the healing is recorded
    healed = json.loads((work / "span+layer-p2+heal" / "shortrt.json").read_text())
    assert len(healed["layers"]) == 7 and healed["replacement"]["kind"] == "layer"
    assert healed["healing"]["stopped"] in ("time_limit", "steps", "patience")
    assert "healed -2+1 vs dense" in out and "KV cache 0.875x (7/8 layers)" in out
    assert out.count("prompt: ") == 3 and "Persuasion" in out and "SciQ" in out
