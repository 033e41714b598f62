"""Generation on the C++ runtime: batch, sampling, stop tokens, callbacks, streaming, dtypes (tiny models)."""
import pytest

from runtime_models import IDS_SHORT, hf_logits, make_tiny, rel_err
from shortrt import engine as engine_mod
from shortrt.engine import Engine

PROMPTS = [[1, 17, 250, 3], [1, 99, 42, 42, 7, 123, 5], [5, 6]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gen") / "m", tokenizer=True)


@pytest.fixture(scope="module")
def eng(tiny):
    return Engine(tiny[0], threads=2, max_batch=3)


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.02), ("int8", 0.06)])
def test_packed_dtypes_stay_close_to_fp32(tiny, dtype, bound):
    """bf16 / int8 logits within `bound` (max abs error / max |logit|) of transformers fp32, same argmax."""
    path, model = tiny
    ref = hf_logits(model, IDS_SHORT)
    eng = Engine(path, dtype=dtype)
    out = eng.logits(IDS_SHORT)
    assert rel_err(out, ref) <= bound
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert eng.weight_bytes < Engine(path).weight_bytes * (0.55 if dtype == "bf16" else 0.35)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)])
def test_batch_equals_one_by_one(eng, sampling):
    batch = eng.generate_ids(PROMPTS, max_new_tokens=12, stop=[], **sampling)
    alone = [eng.generate_ids(p, max_new_tokens=12, stop=[], **sampling) for p in PROMPTS]
    assert batch == alone
    assert all(len(b) == 12 for b in batch)


def test_more_prompts_than_max_batch_run_in_groups(tiny):
    small = Engine(tiny[0], max_batch=2)
    assert small.generate_ids(PROMPTS, max_new_tokens=5, stop=[]) == \
        [small.generate_ids(p, max_new_tokens=5, stop=[]) for p in PROMPTS]


def test_sampling_is_seeded_and_parameters_matter(eng):
    p = PROMPTS[1]
    a = eng.generate_ids(p, max_new_tokens=20, temperature=1.0, seed=1, stop=[])
    assert a == eng.generate_ids(p, max_new_tokens=20, temperature=1.0, seed=1, stop=[])
    assert a != eng.generate_ids(p, max_new_tokens=20, temperature=1.0, seed=2, stop=[])
    greedy = eng.generate_ids(p, max_new_tokens=20, stop=[])
    assert eng.generate_ids(p, max_new_tokens=20, temperature=1.5, top_k=1, seed=3, stop=[]) == greedy
    assert eng.generate_ids(p, max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=3, stop=[]) == greedy
    # top_k=5: every sampled token is among the 5 most likely after its prefix.
    out = eng.generate_ids(p, max_new_tokens=10, temperature=2.0, top_k=5, seed=4, stop=[])
    logits = eng.logits(p + out)
    for i, tok in enumerate(out):
        top5 = set(logits[len(p) - 1 + i].argsort()[-5:].tolist())
        assert tok in top5


def test_stop_tokens_and_max_new_tokens(eng):
    p = PROMPTS[0]
    free = eng.generate_ids(p, max_new_tokens=16, stop=[])
    assert len(free) == 16
    stop_at = free[5]
    cut = eng.generate_ids(p, max_new_tokens=16, stop=[stop_at])
    assert cut == free[:free.index(stop_at)]  # the stop token itself is not returned
    assert eng.generate_ids(p, max_new_tokens=0) == []


def test_default_stop_is_config_eos(tmp_path):
    path, _ = make_tiny(tmp_path / "m")
    eng = Engine(path)
    free = eng.generate_ids([1, 2, 3], max_new_tokens=30, stop=[])
    eos = free[3]
    path2, _ = make_tiny(tmp_path / "m2", eos_token_id=eos)
    assert Engine(path2).generate_ids([1, 2, 3], max_new_tokens=30) == free[:free.index(eos)]


def test_callback_sees_every_token_and_can_stop(eng):
    seen = []
    out = eng.generate_ids(PROMPTS, max_new_tokens=8, stop=[], callback=lambda s, t: seen.append((s, t)))
    assert sorted(seen) == sorted((s, t) for s, toks in enumerate(out) for t in toks)
    stopped = eng.generate_ids(PROMPTS[0], max_new_tokens=8, stop=[], callback=lambda s, t: len(seen) < 0)
    assert len(stopped) == 1  # False after the first token stops the sequence


def test_callback_exception_propagates(eng):
    def boom(seq, tok):
        raise KeyError("from callback")

    with pytest.raises(KeyError, match="from callback"):
        eng.generate_ids(PROMPTS[0], max_new_tokens=4, callback=boom)
    assert len(eng.generate_ids(PROMPTS[0], max_new_tokens=4, stop=[])) == 4  # engine still usable


def test_text_generate_and_stream_agree(eng):
    text = eng.generate("Once upon a time", max_new_tokens=24, stop=[])
    ids = eng.generate_ids(eng.encode("Once upon a time"), max_new_tokens=24, stop=[])
    assert text == eng.decode(ids)
    pieces = list(eng.stream("Once upon a time", max_new_tokens=24, stop=[]))
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert eng.generate(["Once upon a time", "The quick"], max_new_tokens=10, stop=[]) == \
        [eng.generate(p, max_new_tokens=10, stop=[]) for p in ["Once upon a time", "The quick"]]


def test_stream_can_be_closed_early(eng):
    it = eng.stream("The quick", max_new_tokens=200, stop=[])
    first = next(it)
    it.close()  # stops the background generation and joins it
    assert isinstance(first, str)
    assert eng.generate("The quick", max_new_tokens=3, stop=[]) is not None


def test_incremental_detokenizer_handles_split_utf8(eng):
    tok = eng.tokenizer
    ids = tok.encode("Héllo wörld ✓ ünïcode").ids
    detok = engine_mod.Detokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_module_generate_accepts_path_and_engine(tiny, eng):
    a = engine_mod.generate(tiny[0], "Once upon", max_new_tokens=6, stop=[])
    assert a == engine_mod.generate(eng, "Once upon", max_new_tokens=6, stop=[])
    import shortrt

    assert shortrt.generate(str(tiny[0]), ["Once upon"], max_new_tokens=6, stop=[]) == [a]


def test_gil_is_released_while_generating(eng):
    """Python code keeps running in the main thread while C++ generates in another."""
    import threading
    import time

    window = []
    done = threading.Event()

    def work():
        window.append(time.perf_counter())
        eng.generate_ids(PROMPTS[1], max_new_tokens=240, stop=[])
        window.append(time.perf_counter())
        done.set()

    worker = threading.Thread(target=work)
    stamps = []
    worker.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    worker.join()
    t0, t1 = window
    middle = [t for t in stamps if t0 + 0.25 * (t1 - t0) < t < t1 - 0.25 * (t1 - t0)]
    assert len(middle) > 100  # with the GIL held through the C++ call this would be 0
