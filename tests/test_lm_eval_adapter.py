"""The lm-evaluation-harness adapter (shortrt.lm_eval_adapter): lm-eval's own evaluator, offline, on
local task files built from the ARC-Easy questions `shortrt eval` scores.

What is compared with what:
- acc, acc_norm against `shortrt eval` (shortrt.evaluation, transformers in fp32) on the same
  questions, per question. Definitions: shortrt's acc_norm divides a choice's log-likelihood by
  the UTF-8 bytes of the choice text it scores, which starts with the space; lm-eval's acc_norm
  divides by the characters and acc_bytes by the UTF-8 bytes of the choice as the task lists it,
  without target_delimiter. The like-for-like task lists each choice with its space and
  target_delimiter "", so lm-eval's acc_bytes is shortrt's acc_norm exactly (and acc_norm too for
  ASCII choices); the task written as lm-eval's own arc_easy is (delimiter " ", choices without
  it) scores the same continuation strings, so acc agrees and its acc_norm is checked against
  the per-character definition.
- loglikelihood values against log-softmax of Engine.logits on the same tokens (float64), 1e-9.
- loglikelihood_rolling against shortrt.evaluation.runtime_perplexity on the same tokens, 1e-9
  relative.
- generate_until against Engine.generate_ids's greedy tokens, exactly.
"""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from runtime_models import make_tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed (pip install lm-eval==0.4.13; make setup installs it)")

TOKENIZER_TEXT = ("Question: Which of these is a source of energy for plants?\nAnswer: sunlight, water, soil. "
                  "The quick brown fox jumps over the lazy dog. Once upon a time there was a model.") * 10


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory):
    """lm_eval imported with the datasets cache in a temporary directory and the hub switched off."""
    import os

    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    import shortrt.lm_eval_adapter  # noqa: F401  registers "shortrt"
    return lm_eval


def save_hf_tokenizer(path):
    """A byte-level BPE (300 tokens: <pad>, <s>, </s>, the 256 bytes, merges) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (weights scaled so logits are far from uniform) with a real tokenizer: bos 1, eos 2."""
    path, _ = make_tiny(tmp_path_factory.mktemp("lmeval") / "tiny", seed=5, max_position_embeddings=1024)
    save_hf_tokenizer(path)
    return path


def write_tasks(folder, questions) -> dict:
    """Two lm-eval tasks over the same questions (a local jsonl file): {"like": name, "standard": name}."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": q.context, "choices": list(q.choices), "bare": [c[1:] for c in q.choices], "gold": q.gold}
            for q in questions]
    assert all(c.startswith(" ") for q in questions for c in q.choices)
    data = folder / "arc_easy_sample.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm", "acc_bytes")]
    base = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_target": "gold",
            "metric_list": metrics}
    names = {"like": f"srt_arc_like_{folder.name}", "standard": f"srt_arc_std_{folder.name}"}
    (folder / "like.yaml").write_text(yaml.safe_dump({**base, "task": names["like"], "doc_to_choice": "choices",
                                                      "target_delimiter": ""}))
    (folder / "standard.yaml").write_text(yaml.safe_dump({**base, "task": names["standard"],
                                                          "doc_to_choice": "bare"}))
    return names


def direct_logprob(engine, context_ids, cont_ids) -> float:
    ids = list(context_ids) + list(cont_ids)
    logp = torch.log_softmax(torch.from_numpy(engine.logits(ids[:-1])).double(), dim=-1)
    n = len(context_ids)
    return sum(float(logp[n - 1 + t, tok]) for t, tok in enumerate(cont_ids))


def check_against_shortrt_eval(lm_eval, model_path, folder, n, dtype="fp32"):
    from lm_eval.tasks import TaskManager

    from shortrt.eval_tasks import sample_task
    from shortrt.evaluation import evaluate_layer_maps

    questions = sample_task("arc_easy", n, seed=0)
    names = write_tasks(folder, questions)
    out = lm_eval.simple_evaluate(model="shortrt", model_args=f"pretrained={model_path},dtype={dtype}",
                                  tasks=list(names.values()), task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True)
    ours = evaluate_layer_maps(model_path, {"m": None}, ["arc_easy"], n_samples=n, seed=0, per_item=True,
                               progress=False)["m"]["tasks"]["arc_easy"]
    like = out["results"][names["like"]]
    assert like["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert like["acc_bytes,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    samples = sorted(out["samples"][names["like"]], key=lambda s: s["doc_id"])
    assert [int(s["acc"]) for s in samples] == ours["items"]["correct"]
    assert [int(s["acc_bytes"]) for s in samples] == ours["items"]["correct_norm"]
    for s, q, norm in zip(samples, questions, ours["items"]["correct_norm"]):
        if all(c.isascii() for c in q.choices):
            assert int(s["acc_norm"]) == norm  # characters = bytes
    # The harness's usual form: the same continuations, acc_norm per character of the bare choice.
    std = sorted(out["samples"][names["standard"]], key=lambda s: s["doc_id"])
    assert [int(s["acc"]) for s in std] == ours["items"]["correct"]
    for s, q in zip(std, questions):
        lls = np.array([r[0] for r in s["filtered_resps"]])
        assert [a for _, a in s["arguments"]] == list(q.choices)
        assert int(s["acc_norm"]) == int(np.argmax(lls / [len(c) - 1 for c in q.choices]) == q.gold)
    return out, samples, questions


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_multiple_choice_through_simple_evaluate_tiny(lm_eval_env, tiny, tmp_path, dtype):
    from shortrt import Engine

    if dtype == "fp32":
        _, samples, questions = check_against_shortrt_eval(lm_eval_env, tiny, tmp_path / "tasks", 12)
    else:  # int8 only against the runtime itself
        from lm_eval.tasks import TaskManager
        from shortrt.eval_tasks import sample_task

        questions = sample_task("arc_easy", 6, seed=0)
        names = write_tasks(tmp_path / "tasks8", questions)
        out = lm_eval_env.simple_evaluate(model="shortrt", model_args=f"pretrained={tiny},dtype=int8",
                                          tasks=[names["like"]], task_manager=TaskManager(include_path=str(tmp_path / "tasks8")),
                                          log_samples=True)
        samples = sorted(out["samples"][names["like"]], key=lambda s: s["doc_id"])
    # Every log-likelihood lm-eval recorded is the runtime's own, from its logits.
    engine = Engine(tiny, dtype=dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    for s, q in zip(samples, questions):
        ctx = tok.encode(q.context)
        for (ll, _), choice in zip(s["filtered_resps"], q.choices):
            whole = tok.encode(q.context + choice)
            assert whole[:len(ctx)] == ctx
            assert ll == pytest.approx(direct_logprob(engine, ctx, whole[len(ctx):]), abs=1e-9)


@pytest.mark.slow
def test_multiple_choice_default_model_equals_shortrt_eval(lm_eval_env, default_model, tmp_path):
    out, samples, questions = check_against_shortrt_eval(lm_eval_env, default_model.path, tmp_path / "tasks", 24)
    from shortrt import Engine

    engine = Engine(default_model.path)
    tok = default_model.tokenizer()
    for s, q in list(zip(samples, questions))[:5]:
        ctx = tok.encode(q.context)
        for (ll, _), choice in zip(s["filtered_resps"], q.choices):
            whole = tok.encode(q.context + choice)
            assert ll == pytest.approx(direct_logprob(engine, ctx, whole[len(ctx):]), abs=1e-9)


def make_lm(model, **kw):
    from shortrt.lm_eval_adapter import ShortrtLM

    return ShortrtLM(model, **kw)


def requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_shared_inputs_give_the_bits_of_a_lone_run(lm_eval_env, tiny):
    lm = make_lm(tiny)
    ctx = "Question: Which of these is a source of energy for plants?\nAnswer:"
    args = [(ctx, " sunlight"), (ctx, " s"), (ctx, " sunlight water"), (ctx, " soil"), (ctx, " sunlight"),
            ("", "Once upon a time"), ("The quick brown ", "fox")]
    together = lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    alone = [lm.loglikelihood(requests("loglikelihood", [a]), disable_tqdm=True)[0] for a in args]
    assert together == alone  # bit for bit: one run of a longer input serves its prefixes
    tok = lm.tokenizer
    for (c, x), (ll, greedy) in zip(args, together):
        if c == "":
            ctx_ids, cont_ids = [lm.prefix_token_id], tok.encode(x)
        else:
            c, x = c.rstrip(), c[len(c.rstrip()):] + x  # lm-eval moves the context's trailing space
            ctx_ids = tok.encode(c)
            cont_ids = tok.encode(c + x)[len(ctx_ids):]
        assert ll == pytest.approx(direct_logprob(lm.engine, ctx_ids, cont_ids), abs=1e-9)
        logits = lm.engine.logits(ctx_ids + cont_ids[:-1])[len(ctx_ids) - 1:]
        assert greedy == bool((logits.argmax(1) == np.array(cont_ids)).all())


def test_loglikelihood_cuts_long_contexts_from_the_left(lm_eval_env, tiny):
    lm = make_lm(tiny, max_length=24)
    ctx = "The quick brown fox jumps over the lazy dog. " * 4
    (ll, _), = lm.loglikelihood(requests("loglikelihood", [(ctx, "Once upon a time")]), disable_tqdm=True)
    tok = lm.tokenizer
    ctx_ids = tok.encode(ctx.rstrip())
    cont_ids = tok.encode(ctx + "Once upon a time")[len(ctx_ids):]
    whole = (ctx_ids + cont_ids)[-25:]
    assert len(ctx_ids) + len(cont_ids) > 25
    assert ll == pytest.approx(direct_logprob(lm.engine, whole[:-len(cont_ids)], cont_ids), abs=1e-9)


def rolling_case(lm, text, window):
    """(rolling log-likelihood, runtime_perplexity's summed log-probability) on text's tokens, with
    lm-eval windows of `window` tokens and shortrt windows of window + 1 advancing by window."""
    from shortrt.evaluation import runtime_perplexity

    ids = lm.tok_encode(text)
    assert ids == lm.tokenizer.encode(text, add_special_tokens=False)  # no BOS added: the prefix token is
    bos = lm.tokenizer.convert_ids_to_tokens(lm.prefix_token_id)
    rolled, = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    ppl = runtime_perplexity(lm.engine, n_tokens=10**6, seq_len=window + 1, stride=window, texts=[bos + text])
    assert ppl["tokens"] == len(ids)
    return rolled, -ppl["nll"] * ppl["tokens"]


def test_loglikelihood_rolling_equals_runtime_perplexity(lm_eval_env, tiny):
    from shortrt import Engine

    L = 20
    lm = make_lm(tiny, engine=Engine(tiny, max_seq=L + 1), max_length=L)
    tok = lm.tokenizer
    ids = tok.encode(TOKENIZER_TEXT)[:2 * L]
    text = tok.decode(ids)
    assert tok.encode(text) == ids and len(ids) == 2 * L  # two full windows: both methods window alike
    rolled, ref = rolling_case(lm, text, L)
    assert rolled == pytest.approx(ref, rel=1e-9)
    short = tok.decode(ids[:L - 3])  # one window
    rolled, ref = rolling_case(lm, short, L)
    assert rolled == pytest.approx(ref, rel=1e-9)


@pytest.mark.slow
def test_loglikelihood_rolling_default_model(lm_eval_env, default_model):
    from shortrt import Engine
    from shortrt.data import heldout_texts

    L = 128
    lm = make_lm(default_model.path, engine=Engine(default_model.path, dtype="int8", max_seq=L + 1), max_length=L)
    tok = lm.tokenizer
    for cut in range(2 * L, 2 * L - 20, -2):
        ids = tok.encode(heldout_texts()[0], add_special_tokens=False)[:cut]
        text = tok.decode(ids)
        if tok.encode(text) == ids:
            break
    rolled, ref = rolling_case(lm, text, L)
    assert rolled == pytest.approx(ref, rel=1e-9)
    assert math.isfinite(rolled) and rolled < 0


def test_generate_until_gives_the_runtime_greedy_tokens(lm_eval_env, tiny):
    lm = make_lm(tiny, batch_size=3)
    prompts = ["Once upon a time", "The quick brown fox", "Question: Which of these", "sunlight, water", "A"]
    N = 12
    greedy = [lm.engine.generate_ids(lm.tok_encode(p), max_new_tokens=N) for p in prompts]
    texts = [lm.tok_decode(g) for g in greedy]
    out = lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": N}) for p in prompts]),
                            disable_tqdm=True)
    assert out == texts
    # A stop string taken from each greedy text ends it there (and is not part of the result).
    stops = [t[4:6] if len(t) >= 6 else "\x00" for t in texts]
    out = lm.generate_until(requests("generate_until", [(p, {"until": [s], "max_gen_toks": N, "do_sample": False})
                                                        for p, s in zip(prompts, stops)]), disable_tqdm=True)
    assert out == [t[:t.find(s)] if s in t else t for t, s in zip(texts, stops)]
    assert lm.engine.stats()["running"] == 0 and not lm.engine.has_work
    # A context longer than max_length - max_gen_toks keeps its last tokens.
    short = make_lm(tiny, max_length=20)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    ids = short.tok_encode(long_prompt)
    assert len(ids) > 20 - 6
    got, = short.generate_until(requests("generate_until", [(long_prompt, {"until": [], "max_gen_toks": 6})]),
                                disable_tqdm=True)
    assert got == short.tok_decode(short.engine.generate_ids(ids[-(20 - 6):], max_new_tokens=6))


def test_generate_until_sampling_uses_the_runtime_sampler(lm_eval_env, tiny):
    lm = make_lm(tiny, batch_size=2)
    prompts = ["Once upon a time", "The quick brown fox"]
    kw = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 0.8, "top_k": 20, "seed": 3}
    out = lm.generate_until(requests("generate_until", [(p, dict(kw)) for p in prompts]), disable_tqdm=True)
    expected = [lm.tok_decode(lm.engine.generate_ids(lm.tok_encode(p), max_new_tokens=10, temperature=0.8, top_k=20,
                                                     seed=3 + i)) for i, p in enumerate(prompts)]
    assert out == expected
    greedy = lm.tok_decode(lm.engine.generate_ids(lm.tok_encode(prompts[0]), max_new_tokens=10))
    assert out[0] != greedy  # sampling did happen


@pytest.mark.slow
def test_generate_until_default_model(lm_eval_env, default_model):
    lm = make_lm(default_model.path, dtype="int8", batch_size=2)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    greedy = [lm.tok_decode(lm.engine.generate_ids(lm.tok_encode(p), max_new_tokens=24)) for p in prompts]
    out = lm.generate_until(requests("generate_until", [(p, {"until": ["\n\n"], "max_gen_toks": 24})
                                                        for p in prompts]), disable_tqdm=True)
    assert out == [g.split("\n\n")[0] for g in greedy]
    assert any(len(o) < len(g) for o, g in zip(out, greedy))  # a stop string did cut (" Paris.\n\nThe ...")


@pytest.mark.parametrize("kwargs, message", [
    ({"flavour": 1}, "unknown shortrt model argument"),
    ({"batch_size": "auto"}, "'auto' is not supported"),
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"max_length": 10**6}, "max_length must be at most"),
])
def test_bad_model_arguments_are_clear_errors(lm_eval_env, tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_lm(tiny, **kwargs)


def test_a_gpu_device_is_ignored_with_a_warning(lm_eval_env, tiny, caplog):
    lm = make_lm(tiny, device="cuda:0")  # what lm-eval's command line passes by default
    assert "runs on the CPU" in caplog.text and lm.engine.num_layers == 4


def test_bad_generation_arguments_are_clear_errors(lm_eval_env, tiny):
    lm = make_lm(tiny, max_length=32)
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        lm.generate_until(requests("generate_until", [("A", {"until": [], "num_beams": 4})]), disable_tqdm=True)
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate_until(requests("generate_until", [("A", {"until": [], "max_gen_toks": 32})]), disable_tqdm=True)


def test_registered_by_name_and_command_line(lm_eval_env, tiny, tmp_path, capsys):
    from lm_eval.api.registry import get_model

    from shortrt.eval_tasks import sample_task
    from shortrt.lm_eval_adapter import ShortrtLM

    assert get_model("shortrt") is ShortrtLM
    lm = get_model("shortrt").create_from_arg_string(f"pretrained={tiny},dtype=int8,threads=1,max_seq=64",
                                                     {"batch_size": 2, "max_batch_size": None, "device": None})
    assert (lm.engine.dtype, lm.engine.threads, lm.engine.max_seq, lm.engine.max_batch) == ("int8", 1, 64, 2)
    names = write_tasks(tmp_path / "tasks", sample_task("arc_easy", 4, seed=1))
    out_json = tmp_path / "out" / "results.json"
    rc, out, err = run_cli(["lm-eval", tiny, "--tasks", names["like"], "--include-path", tmp_path / "tasks",
                            "--json", out_json, "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads(out_json.read_text())["results"][names["like"]]
    assert names["like"] in out and "acc_bytes" in out
    assert 0 <= result["acc,none"] <= 1 and result["sample_len"] == 4
    rc, out, err = run_cli(["lm-eval", tiny, "--tasks", "no_such_task_xyz"], capsys)
    assert rc == 1 and "unknown lm-eval task(s) ['no_such_task_xyz']" in err
