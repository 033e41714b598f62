"""Healing by distillation (shortrt.heal): the loss goes down, LoRA merges exactly, the output is
a checkpoint of the student's layout that every runtime loads, and bad input is refused early.

The teacher is a tiny 6-layer Llama first trained for a few seconds on the test's prose, so that
removing layers hurts it and healing has something to recover. Tolerances: merged vs unmerged
adapters within 1e-5 (absolute, logits); transformers, the C++ engine in fp32 and the reference
model against the trained model in memory within 1e-4 of the largest logit (as test_replace).
"""
import random
import signal

import pytest
import torch

import shortrt
from conftest import read_meta, tensors_of
from runtime_models import WORDS, make_tiny, rel_err
from shortrt import _C
from shortrt.cli import main
from shortrt.engine import Engine
from shortrt.errors import ShortrtError
from shortrt.healing import heal, make_trainable
from shortrt.layer_plan import load_for_plan, plan_logits
from shortrt.layermap import LayerMap
from shortrt.lora import LoRALinear, merge
from shortrt.reference import ReferenceModel
from slow_writer import start_slow_write

TOL = 1e-4
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 123, 5, 288, 64, 11, 200, 150, 9, 33, 71, 4]
FAST = dict(n_tokens=4096, seq_len=64, steps=30, batch=4, precision="fp32", progress=False)


def prose(n_words=3000, seed=0):
    """Text with structure a model can learn: each word mostly followed by one of two others (the
    same two for every seed; the seed draws the text)."""
    follow = {w: random.Random(i).sample(WORDS, 2) for i, w in enumerate(WORDS)}
    rng = random.Random(seed)
    word, out = WORDS[0], []
    for _ in range(n_words):
        out.append(word)
        word = rng.choice(follow[word]) if rng.random() < 0.9 else rng.choice(WORDS)
    return [" ".join(out)]


def train_lm(model, tokenizer_dir, steps=60):
    """A few seconds of next-token training, so the teacher knows the prose and pruning hurts it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor(tok(prose()[0])["input_ids"][:64 * 32]).view(32, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = ids[torch.randperm(32, generator=g)[:8]]
        loss = model(rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path, model = make_tiny(tmp_path_factory.mktemp("heal") / "dense", num_hidden_layers=6, tokenizer=True)
    train_lm(model, path).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory):
    return shortrt.prune(dense, LayerMap.from_removed(6, [2, 3], method="manual"),
                         tmp_path_factory.mktemp("heal") / "pruned")


@pytest.fixture(scope="module")
def healed(pruned, tmp_path_factory):
    """(healed checkpoint, the trained transformers model heal wrote it from)."""
    import shortrt.healing as healing

    seen = {}
    original = healing.trained_values

    def capture(student, hf, *args, **kw):
        seen["hf"] = hf  # merged by trained_values: the model that was written
        return original(student, hf, *args, **kw)

    healing.trained_values = capture
    try:
        out = heal(pruned, tmp_path_factory.mktemp("heal") / "healed", texts=prose(), **FAST)
    finally:
        healing.trained_values = original
    return out, seen["hf"]


def heldout_ppl(model, text) -> float:
    """Perplexity of a checkpoint on text that no training saw (layer_plan forward)."""
    m = shortrt.load(model)
    hf, plan = load_for_plan(m)
    ids = torch.tensor(m.tokenizer()(text)["input_ids"][:64 * 8]).view(8, 64)
    logp = torch.log_softmax(plan_logits(hf, ids, plan)[:, :-1], dim=-1)
    return float(torch.exp(-logp.gather(-1, ids[:, 1:, None]).mean()))


# ---- training ---------------------------------------------------------------------------------

def test_healing_lowers_kl_and_perplexity(healed, pruned, dense):
    out, _ = healed
    rec = out.layer_map.healing
    assert rec["kl_after"] < 0.7 * rec["kl_before"]
    assert rec["ppl_after"] < rec["ppl_before"]
    assert rec["teacher_ppl"] < rec["ppl_before"]  # the teacher is better: removing layers hurt
    assert rec["best_step"] > 0 and rec["history"][0][0] == 0
    # On prose that neither the teacher's training nor the healing saw.
    unseen = prose(seed=7)[0]
    assert heldout_ppl(out, unseen) < heldout_ppl(pruned, unseen)


def test_zero_b_start_equals_the_student_exactly(pruned):
    hf, plan = load_for_plan(pruned)
    before = plan_logits(hf, torch.tensor([IDS]), plan)
    params, trained = make_trainable(hf, plan, rank=4, alpha=8.0, full=False, seed=0)
    assert len(trained) == 7 * len(plan) and len(params) == 2 * len(trained)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, LoRALinear)
    assert torch.equal(plan_logits(hf, torch.tensor([IDS]), plan), before)


def test_lora_merge_equals_the_adapter_forward(pruned):
    hf, plan = load_for_plan(pruned)
    params, _ = make_trainable(hf, plan, rank=4, alpha=8.0, full=False, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params[1::2]:  # the B matrices: as if trained
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapted = plan_logits(hf, torch.tensor([IDS]), plan)
    for step in plan:
        assert len(merge(hf.model.layers[step.index])) == 7
    assert not any(isinstance(m, LoRALinear) for m in hf.modules())
    merged = plan_logits(hf, torch.tensor([IDS]), plan)
    assert (merged - adapted).abs().max() <= 1e-5
    assert (adapted - plan_logits(load_for_plan(pruned)[0], torch.tensor([IDS]), plan)).abs().max() > 1e-3


def test_bf16_lora_merges_into_the_fp32_weights(pruned, tmp_path):
    """precision="bf16": the frozen weights run in bf16, but the written weight is the checkpoint's
    own fp32 weight plus the fp32 adapter delta, so no weight is rounded to bf16."""
    import shortrt.healing as healing

    seen = {}
    original = healing.trained_values

    def capture(student, hf, plan, trained, full):
        layer = hf.model.layers[plan[0].index]
        seen["dtype"] = layer.mlp.down_proj.base.weight.dtype
        seen["delta"] = layer.mlp.down_proj.delta()
        return original(student, hf, plan, trained, full)

    healing.trained_values = capture
    try:
        out = heal(pruned, tmp_path / "h", texts=prose(), **{**FAST, "precision": "bf16", "steps": 10})
    finally:
        healing.trained_values = original
    rec = out.layer_map.healing
    assert rec["precision"] == "bf16" and rec["kl_after"] < rec["kl_before"]
    assert seen["dtype"] == torch.bfloat16 and seen["delta"].dtype == torch.float32 and seen["delta"].abs().max() > 0
    name = "model.layers.0.mlp.down_proj.weight"
    before, after = tensors_of(pruned.path)[name], tensors_of(out.path)[name]
    assert after.dtype == before.dtype == torch.float32
    assert torch.equal(after, before + seen["delta"])
    assert healing.resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        healing.resolve_precision("fp16")


def test_full_mode_trains_every_retained_weight(pruned, tmp_path):
    out = heal(pruned, tmp_path / "full", texts=prose(), full=True, lr=1e-3, **{**FAST, "steps": 20})
    rec = out.layer_map.healing
    assert rec["mode"] == "full" and "rank" not in rec and rec["lr"] == 1e-3
    src = tensors_of(pruned.path)
    layer_params = sum(t.numel() for k, t in src.items() if k.startswith("model.layers."))
    assert rec["trainable_parameters"] == layer_params
    assert rec["kl_after"] < rec["kl_before"]
    dst = tensors_of(out.path)
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(dst["lm_head.weight"], src["lm_head.weight"])
    assert not torch.equal(dst["model.layers.0.input_layernorm.weight"], src["model.layers.0.input_layernorm.weight"])


def test_time_limit_stops_training_with_a_last_check(pruned, tmp_path):
    out = heal(pruned, tmp_path / "t", texts=prose(), time_limit=1e-6, **FAST)
    rec = out.layer_map.healing
    assert rec["steps"] == 1 and rec["stopped"] == "time_limit" and rec["time_limit"] == 1e-6
    assert [h[0] for h in rec["history"]] == [0, 1]


def test_time_limit_fits_the_schedule_into_the_time(pruned, tmp_path, monkeypatch):
    """With more steps allowed than the time holds, the cosine schedule is re-planned from the
    measured pace, so the learning rate has decayed (to near its 10 % floor) when time runs out."""
    import shortrt.healing as healing

    monkeypatch.setattr(healing, "PATIENCE", 10**9)  # only the clock stops it
    out = heal(pruned, tmp_path / "t", texts=prose(), time_limit=4.0, **{**FAST, "steps": 100000})
    rec = out.layer_map.healing
    assert rec["stopped"] == "time_limit" and 2 <= rec["steps"] < 100000
    assert rec["last_lr"] <= 0.25 * rec["lr"]
    assert rec["seconds"]["train"] + rec["seconds"]["heldout"] < 4.0 + 3.0  # one step and one check past it, at most


# ---- the written checkpoint -----------------------------------------------------------------

def test_healed_checkpoint_layout_and_record(healed, pruned, dense):
    out, _ = healed
    meta = read_meta(out)
    assert meta["layers"] == read_meta(pruned)["layers"] and meta["removed"] == [2, 3]
    assert meta["source"] == str(dense) and out.config() == pruned.config()
    rec = meta["healing"]
    assert rec["teacher"] == str(dense) and rec["mode"] == "lora" and rec["rank"] == 8 and rec["alpha"] == 16
    assert rec["data"]["n_tokens"] == 4096 and rec["data"]["seq_len"] == 64
    assert rec["data"]["train_sequences"] + rec["data"]["heldout_sequences"] == 64
    assert rec["steps"] <= 30 and rec["stopped"] in ("steps", "patience") and rec["tokens_per_second"] > 0 and rec["seconds"]["total"] > 0
    assert out.layer_map.healing == rec  # the Python reader parses it
    info = _C.read_checkpoint(str(out.path))  # and the C++ reader accepts it
    assert len(info["plan"]) == 4
    src, dst = tensors_of(pruned.path), tensors_of(out.path)
    assert sorted(src) == sorted(dst) and all(src[k].dtype == dst[k].dtype for k in src)
    assert torch.equal(src["model.layers.1.input_layernorm.weight"], dst["model.layers.1.input_layernorm.weight"])
    assert not torch.equal(src["model.layers.1.mlp.down_proj.weight"], dst["model.layers.1.mlp.down_proj.weight"])


def test_info_shows_the_healing(healed, capsys):
    assert main(["info", str(healed[0].path)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("healed")]
    assert len(line) == 1 and "LoRA rank 8" in line[0] and "held-out KL" in line[0]


def test_trainable_parameter_count(healed):
    rec = healed[0].layer_map.healing
    h, kv, inter, r = 64, 32, 96, 8  # TINY: hidden 64, 2 of 4 heads for k/v, intermediate 96
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)  # q, o; k, v; gate, up, down
    assert rec["trainable_parameters"] == 4 * per_layer


def test_healed_checkpoint_loads_in_transformers_and_engine(healed):
    out, trained = healed
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = plan_logits(trained, ids, out.plan())[0].numpy()
        hf_logits = out.load_hf()(ids).logits[0].numpy()
    assert rel_err(hf_logits, expected) <= TOL
    assert rel_err(Engine(out, threads=1).logits(IDS), expected) <= TOL
    assert rel_err(ReferenceModel.load(out)(ids)[0].numpy(), expected) <= TOL


@pytest.mark.parametrize("kind", ["attention", "mlp_replacement"])
def test_attention_less_students_heal(kind, dense, tmp_path):
    if kind == "attention":
        student = shortrt.prune(dense, LayerMap.from_removed_attention(6, [2, 3, 4]), tmp_path / "s")
    else:
        student = shortrt.replace(dense, LayerMap.from_removed(6, [2, 3, 4], method="span"), tmp_path / "s",
                                  kind="mlp", texts=prose(), n_tokens=2048, seq_len=64, steps=5, progress=False)
    out = heal(student, tmp_path / "h", texts=prose(), **FAST)
    rec = out.layer_map.healing
    assert rec["kl_after"] < rec["kl_before"] and rec["ppl_after"] < rec["ppl_before"]
    assert [(e.kind, e.attention, e.mlp) for e in out.layer_map.layers] == \
        [(e.kind, e.attention, e.mlp) for e in student.layer_map.layers]
    assert out.layer_map.replacement == student.layer_map.replacement
    assert sorted(tensors_of(out.path)) == sorted(tensors_of(student.path))
    expected = ReferenceModel.load(out)(torch.tensor([IDS]))[0].numpy()
    assert rel_err(Engine(out, threads=1).logits(IDS), expected) <= TOL
    hf, plan = load_for_plan(out)
    assert rel_err(plan_logits(hf, torch.tensor([IDS]), plan)[0].numpy(), expected) <= TOL


def test_cli_heal_with_hidden_mse(pruned, tmp_path, capsys):
    data = tmp_path / "prose.txt"
    data.write_text(prose()[0])
    rc = main(["heal", str(pruned.path), "--out", str(tmp_path / "h"), "--data", str(data), "--tokens", "2048",
               "--seq-len", "64", "--steps", "20", "--rank", "4", "--hidden-weight", "0.5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out KL" in out and "LoRA rank 4" in out
    rec = read_meta(tmp_path / "h")["healing"]
    assert rec["hidden_weight"] == 0.5 and "hidden mse" in rec["loss"]
    assert rec["kl_after"] < rec["kl_before"]


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("args,phrase", [
    (["--rank", "0"], "argument --rank: must be between 1 and 4096, got 0"),
    (["--temperature", "0"], "argument --temperature: must be a finite number in (0, inf]"),
    (["--lr", "-1"], "argument --lr: must be a finite number in (0, inf]"),
    (["--tokens", "many"], "argument --tokens: expected an integer, got 'many'"),
    (["--hidden-weight", "nan"], "argument --hidden-weight: must be a finite number"),
    (["--steps", "0"], "argument --steps: must be between 1 and"),
    (["--time-limit", "-1"], "argument --time-limit: must be a finite number in [0, inf]"),
    (["--seq-len", "100000"], "seq_len 100000 exceeds the model's max_position_embeddings 256"),
])
def test_cli_bad_arguments_are_one_line_errors(pruned, tmp_path, capsys, args, phrase):
    try:
        rc = main(["heal", str(pruned.path), "--out", str(tmp_path / "h"), *args])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc != 0 and phrase in err and err.count("\n") == 1, err


def test_bad_inputs_are_refused_before_training(pruned, dense, tmp_path):
    with pytest.raises(ShortrtError, match="names no source model"):
        heal(dense, tmp_path / "x", texts=prose())
    with pytest.raises(ShortrtError, match="is the checkpoint being healed"):
        heal(pruned, tmp_path / "x", teacher=pruned.path, texts=prose())
    other, _ = make_tiny(tmp_path / "other", vocab_size=320)
    with pytest.raises(ShortrtError, match="vocabulary of 320 tokens"):
        heal(pruned, tmp_path / "x", teacher=other, texts=prose())
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        heal(pruned, tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        heal(pruned, tmp_path / "x", temperature=float("inf"))
    shallower = shortrt.prune(dense, LayerMap.from_removed(6, [0]), tmp_path / "p5")
    with pytest.raises(ShortrtError, match="hidden_weight needs the dense source model"):
        heal(pruned, tmp_path / "x", teacher=shallower, hidden_weight=1.0, texts=prose())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        heal(pruned, busy, texts=prose(), seq_len=64)
    with pytest.raises(ShortrtError, match="at least 2 calibration sequences of 64 tokens"):
        heal(pruned, tmp_path / "x", texts=["too short"], seq_len=64)
    assert not (tmp_path / "x").exists()


def test_sigterm_during_the_write_leaves_nothing(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's torch: see one_thread
    data = tmp_path / "prose.txt"
    data.write_text(prose()[0])
    parent = tmp_path / "out"
    parent.mkdir()
    proc = start_slow_write(["heal", pruned.path, "--out", parent / "h", "--data", data, "--tokens", "2048",
                             "--seq-len", "64", "--steps", "2", "--no-progress"])
    assert any(p.name.startswith(".h.tmp-") for p in parent.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err
    assert list(parent.iterdir()) == []
