"""shortrt.Engine: the C++ runtime (shortrt._C.Engine) with text in and text out.

    eng = shortrt.Engine("out/smollm2-p8", dtype="int8", threads=2)
    print(eng.generate("Once upon a time", max_new_tokens=32))
    for piece in eng.stream("Once upon a time"):
        print(piece, end="", flush=True)

Tokenization uses the `tokenizers` library on the checkpoint's tokenizer.json;
the chat template (transformers) is applied only when chat=True.

Threads and interruption: the C++ engine computes without the GIL. Calls on one
Engine from several threads run one after another; a callback that calls its own
engine raises RuntimeError (it would otherwise wait on itself). Ctrl-C interrupts
a generate() or logits() on the main thread within a few milliseconds
(KeyboardInterrupt; the engine stays usable). When the interpreter exits, an
atexit hook (registered by shortrt._C) cancels the calls still running in other
threads (daemon threads included) and waits up to 3 s for them, so exiting with
generation in flight is safe.
"""
from __future__ import annotations

import math
import numbers
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import checkpoint
from .errors import CheckpointError

DTYPES = ("fp32", "bf16", "int8", "int4")
KV_DTYPES = ("fp32", "f16", "bf16", "int8")  # KV-cache formats (docs/internals.md: KV cache)
# The LM head's own format (Engine(lm_head_dtype=...)): "same" = the layers' dtype; "auto" (the
# default) = int8 under int4 layers, else the layers' dtype (benchmarks/results/int4_quality.md:
# an int4 head costs 9% perplexity on the default model, an int8 one 0.7%, for 17% more bytes).
LM_HEAD_DTYPES = ("auto", "same") + DTYPES


def resolve_lm_head_dtype(dtype: str, lm_head_dtype: str = "auto") -> str:
    """The LM head's format an Engine(dtype=..., lm_head_dtype=...) uses (csrc/engine.cpp decides the same)."""
    if lm_head_dtype == "auto":
        return "int8" if dtype == "int4" else dtype
    return dtype if lm_head_dtype == "same" else lm_head_dtype


_INT32_MAX = 2**31 - 1
MIN_TEMPERATURE = 1e-4  # below it (0 included) sampling is greedy: see Engine.generate_ids


def _int_arg(name: str, value, low: int, high: int, hint: str = "") -> int:
    """value as an int in [low, high], or a one-line ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    if int(value) > high:
        raise ValueError(f"{name} must be at most {high}{hint}, got {value!r}")
    return int(value)


def _real_arg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, seed=0):
    """The generation arguments, checked and normalized: (max_new_tokens, temperature, top_k, top_p, seed).

    Checked here too so the messages are the same whichever API is used. Whether prompt +
    max_new_tokens fits the context is the C++ engine's check (after the prompt's own)."""
    temperature = _real_arg("temperature", temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature!r}")
    if isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k > _INT32_MAX:
        top_k = _INT32_MAX  # at least the vocabulary: no cut either way
    top_k = _int_arg("top_k", top_k, 0, _INT32_MAX, " (0 disables it)")
    top_p = _real_arg("top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    seed = _int_arg("seed", seed, 0, 2**64 - 1)
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 0, _INT32_MAX)
    return max_new_tokens, temperature, top_k, top_p, seed


class Detokenizer:
    """Turns a growing list of ids into text pieces whose concatenation is the full decode.

    Decodes a short window (from the previous piece's start) so that tokenizers that
    strip or merge at word boundaries decode the same as in the whole text, and holds
    a piece back while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids already turned into text

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class TextEngine:
    """What every shortrt engine shares on top of its generate_ids(): the checkpoint's tokenizer,
    encode/decode (chat template included), stop tokens given as text, and text generate().

    A subclass sets checkpoint_dir (None: token ids only), _tokenizer = _chat_tokenizer = None,
    and defines generate_ids(); shortrt.Engine (C++) and shortrt.gpu_engine.GpuEngine are two."""

    checkpoint_dir: Path | None = None
    _tokenizer = None
    _chat_tokenizer = None

    # --- tokens <-> text ------------------------------------------------------
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer`."""
        if self._tokenizer is None:
            if self.checkpoint_dir is None:
                raise CheckpointError("this engine runs weights without a checkpoint directory, so it has no "
                                      "tokenizer; use generate_ids() with token ids")
            path = self.checkpoint_dir / "tokenizer.json"
            if not path.is_file():
                raise CheckpointError(f"{self.checkpoint_dir} has no tokenizer.json; use generate_ids() with token ids")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        if chat:
            if self._chat_tokenizer is None:  # transformers renders the checkpoint's chat template
                from transformers import AutoTokenizer

                self._chat_tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)
            text = self._chat_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _stop_ids(self, stop) -> list[int] | None:
        if stop is None:
            return None
        if isinstance(stop, (int, str)):
            stop = [stop]
        ids = []
        for s in stop:
            if isinstance(s, str):
                token = self.tokenizer.token_to_id(s)
                if token is None:
                    raise ValueError(f"stop token {s!r} is not a single token of the vocabulary")
                ids.append(token)
            else:
                ids.append(int(s))
        return ids

    def generate(self, prompt_or_prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop=None, chat: bool = False):
        """Text continuation of a prompt (str) or of each prompt in a list (-> list of str)."""
        single = isinstance(prompt_or_prompts, str)
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not prompts:
            raise ValueError("no prompts given")
        encoded = [self.encode(p, chat=chat) for p in prompts]
        for p, ids in zip(prompts, encoded):
            if not ids:
                raise ValueError(f"empty prompt: {p!r} encodes to no tokens")
        out = self.generate_ids(encoded, max_new_tokens, temperature, top_k, top_p, seed, stop)
        texts = [self.decode(ids) for ids in out]
        return texts[0] if single else texts


def prompt_lists(ids) -> tuple[bool, list[list[int]]]:
    """(single, prompts) of generate_ids' argument: one prompt (a list of ids) or several (a list
    of lists); an empty prompt is a ValueError."""
    single = len(ids) == 0 or not isinstance(ids[0], (list, tuple, np.ndarray))
    prompts = [list(map(int, ids))] if single else [list(map(int, p)) for p in ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    return single, prompts


class Engine(TextEngine):
    """The C++ inference engine over one checkpoint.

    model: a checkpoint directory, "default", a .gguf file, or a shortrt.Model.
    dtype: "fp32" (weights used straight from the file), "bf16", "int8" or "int4" (packed at load;
    int4 = blocks of 32 with an fp16 scale and minimum, docs/internals.md). lm_head_dtype: the
    format of the LM head (output projection, read every token, never shrunk by pruning):
    "auto" (the default: int8 when dtype is int4, else dtype), "same" (dtype) or one of DTYPES;
    with tied embeddings the embedding table stays in dtype (one copy serves both when the
    formats agree).
    threads: worker threads (None = all cores). max_seq: context length of the KV cache
    (None = min(max_position_embeddings, 2048)). max_batch: sequences running at once, each
    with its own KV region (longer prompt lists to generate() run in groups). skip_layers:
    checkpoint layers not to run. prefill_chunk: prompt tokens per chunk (None = 64; every
    prompt is cut the same way whatever else runs). step_tokens: rows of one step (None =
    max_batch + prefill_chunk). kv_budget_bytes: size the KV cache by bytes instead: max_batch
    becomes as many sequences of max_seq tokens as fit (kv_bytes_per_sequence(), with Gemma 3's
    sliding layers at their ring; max_batch_for_kv_budget()). kv_dtype: the
    KV cache's format: "fp32", "f16" or "bf16" (half the bytes), "int8" (a quarter, plus one fp32
    scale per kv head and position for K and for V); rows are converted when written.

    Besides generate()/stream(), the request-level interface serves many requests at once:
    submit() queues one, step() runs one forward pass over every running request (one weight
    read for all of them) and returns their new tokens, cancel_request() ends one;
    shortrt.serving wraps that loop for asyncio.

    device: "cpu" (this C++ runtime, the default) or "cuda" / "cuda:N": then Engine(...) returns a
    shortrt.gpu_engine.GpuEngine (torch + Triton on the GPU: same API, dtype "bf16" by default,
    or "fp32" / "int8"; threads and step_tokens do not apply there). Without a usable GPU that
    is a DeviceUnavailableError before anything is loaded.

    Raises CheckpointError for a checkpoint the runtime cannot load, ValueError for a bad
    argument, RuntimeError when the OS refuses a worker thread (ask for fewer threads).
    See the module docstring for threads, Ctrl-C and interpreter exit.
    """

    def __new__(cls, model="default", *args, device: str = "cpu", **kwargs):
        if cls is not Engine or device == "cpu":
            return super().__new__(cls)
        import inspect

        from .gpu_engine import GpuEngine  # torch is imported only for a GPU engine

        given = inspect.signature(cls.__init__).bind(None, model, *args, **kwargs).arguments
        given.pop("self")
        for name in ("threads", "step_tokens"):
            if given.pop(name, None) is not None:
                raise ValueError(f"{name} applies to the CPU runtime, not to device={device!r}")
        return GpuEngine(given.pop("model"), device=device, **given)

    def __init__(self, model="default", dtype: str = "fp32", threads: int | None = None,
                 max_seq: int | None = None, max_batch: int = 1, skip_layers: Sequence[int] | None = None,
                 prefill_chunk: int | None = None, step_tokens: int | None = None,
                 kv_budget_bytes: int | None = None, kv_dtype: str = "fp32", lm_head_dtype: str = "auto",
                 *, device: str = "cpu"):
        from . import _C

        if device != "cpu":  # only a subclass gets here with another device
            raise ValueError(f"{type(self).__name__} runs on the CPU; got device={device!r}")

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r} (expected one of {', '.join(KV_DTYPES)})")
        if lm_head_dtype not in LM_HEAD_DTYPES:
            raise ValueError(f"unknown lm_head_dtype {lm_head_dtype!r} (expected one of {', '.join(LM_HEAD_DTYPES)})")
        if threads is not None:
            threads = _int_arg("threads", threads, 0, 4096, " (0 or None = all cores)")
        if max_seq is not None:
            max_seq = _int_arg("max_seq", max_seq, 1, _INT32_MAX, " (a positive context length)")
        max_batch = _int_arg("max_batch", max_batch, 1, 4096, " (a positive number of sequences)")
        if prefill_chunk is not None:
            prefill_chunk = _int_arg("prefill_chunk", prefill_chunk, 1, _INT32_MAX, " (prompt tokens per chunk)")
        if step_tokens is not None:
            step_tokens = _int_arg("step_tokens", step_tokens, 1, _INT32_MAX, " (rows of one step)")
        self.model = checkpoint.load(model)
        self.checkpoint_dir: Path = self.model.path
        if kv_budget_bytes is not None:  # as many KV regions as the budget holds
            kv_budget_bytes = _int_arg("kv_budget_bytes", kv_budget_bytes, 1, 2**62)
            per_seq = kv_bytes_per_sequence(self.model, max_seq, skip_layers, kv_dtype, prefill_chunk=prefill_chunk,
                                            step_tokens=step_tokens)
            max_batch = max_batch_for_kv_budget(self.model, kv_budget_bytes, max_seq, skip_layers, kv_dtype,
                                                prefill_chunk, step_tokens) if per_seq else 4096
            if max_batch < 1:
                raise ValueError(f"kv_budget_bytes {kv_budget_bytes / 2**20:.1f} MiB holds no sequence: one needs "
                                 f"{per_seq / 2**20:.1f} MiB of KV cache at max_seq (lower max_seq or raise the budget)")
        try:
            self._engine = _C.Engine(str(self.checkpoint_dir), dtype, threads or 0, max_seq or 0, max_batch,
                                     [int(i) for i in (skip_layers or [])], prefill_chunk or 0, step_tokens or 0,
                                     kv_dtype, lm_head_dtype)
        except ValueError as exc:
            raise CheckpointError(f"{self.checkpoint_dir}: {exc}") from None
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.lm_head_dtype = self._engine.lm_head_dtype  # resolved: never "same" or "auto"
        self._tokenizer = None
        self._chat_tokenizer = None

    def __repr__(self) -> str:
        return (f"Engine({str(self.checkpoint_dir)!r}, dtype={self.dtype!r}, kv_dtype={self.kv_dtype!r}, "
                f"lm_head_dtype={self.lm_head_dtype!r}, threads={self.threads}, layers={self.num_layers}, "
                f"max_seq={self.max_seq})")

    # --- properties -------------------------------------------------------
    @property
    def config(self) -> dict:
        return self._engine.config

    @property
    def kv_cache_bytes(self) -> int:
        return self._engine.kv_cache_bytes

    @property
    def weight_bytes(self) -> int:
        return self._engine.weight_bytes

    @property
    def weight_bytes_per_token(self) -> int:
        return self._engine.weight_bytes_per_token

    @property
    def num_layers(self) -> int:
        """Decoder layers executed per token."""
        return self._engine.num_layers

    @property
    def num_attention_layers(self) -> int:
        """Attentions with a KV cache slot."""
        return self._engine.num_attention_layers

    @property
    def layers_run(self) -> list[int]:
        return self._engine.layers_run

    @property
    def max_seq(self) -> int:
        return self._engine.max_seq

    @property
    def max_batch(self) -> int:
        return self._engine.max_batch

    @property
    def threads(self) -> int:
        return self._engine.threads

    # --- generation -------------------------------------------------------
    def generate_ids(self, ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop=None, callback=None):
        """New token ids for one prompt (list of ids) or several (list of lists).

        temperature: 0 = greedy; a temperature below MIN_TEMPERATURE (1e-4) is greedy too,
        since dividing the logits by it overflows float32 (and greedy is its limit). top_k:
        keep the k most likely tokens (0 = all); top_p: nucleus mass in (0, 1]; seed: an
        integer in [0, 2**64). A bad value raises ValueError naming the argument.
        callback(seq, token) is called per token on this thread (seq = index in the list);
        returning False stops that sequence, an exception ends the call and propagates; it
        must not call this engine (RuntimeError). stop: token ids (or single-token strings)
        that end a sequence, None = the config's eos_token_id(s), [] = none.
        """
        max_new_tokens, temperature, top_k, top_p, seed = _check_sampling(
            max_new_tokens, temperature, top_k, top_p, seed)
        single, prompts = prompt_lists(ids)
        stop_ids = self._stop_ids(stop)
        results = []
        for start in range(0, len(prompts), self.max_batch):  # groups of max_batch sequences
            group_cb = None
            if callback is not None:
                group_cb = (lambda offset: lambda seq, token: callback(seq + offset, token))(start)
            results += self._engine.generate(prompts[start:start + self.max_batch], max_new_tokens,
                                             temperature, top_k, top_p, seed, stop_ids, group_cb)
        return results[0] if single else results

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop=None, chat: bool = False) -> Iterator[str]:
        """Yields text pieces as tokens are produced; "".join(pieces) == generate(prompt, ...).

        The C++ generation runs in a background thread (the GIL is released while it
        computes); closing the iterator early (or Ctrl-C while waiting for a piece) stops
        it after the current token. Arguments as for generate_ids.
        """
        max_new_tokens, temperature, top_k, top_p, seed = _check_sampling(
            max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.encode(prompt, chat=chat)
        if not ids:
            raise ValueError(f"empty prompt: {prompt!r} encodes to no tokens")
        stop_ids = self._stop_ids(stop)
        tokens: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def on_token(seq, token):
            tokens.put(token)
            return not cancelled.is_set()

        def run():
            try:
                self._engine.generate([ids], max_new_tokens, temperature, top_k, top_p, seed, stop_ids, on_token)
                tokens.put(done)
            except BaseException as exc:  # handed to the consuming thread
                tokens.put(exc)

        worker = threading.Thread(target=run, name="shortrt-stream", daemon=True)
        detok = Detokenizer(self.tokenizer)
        worker.start()
        try:
            while True:
                item = tokens.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                piece = detok.push(item)
                if piece:
                    yield piece
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            cancelled.set()
            worker.join()

    # --- requests (continuous batching) -------------------------------------
    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=None) -> int:
        """Queue a request (token ids); returns its id. Thread-safe. It waits for a free KV region;
        step() then runs it. stop: token ids (or single-token strings), None = the eos ids."""
        max_new_tokens, temperature, top_k, top_p, seed = _check_sampling(
            max_new_tokens, temperature, top_k, top_p, seed)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return self._engine.submit(ids, max_new_tokens, temperature, top_k, top_p, seed, self._stop_ids(stop))

    def step(self) -> list[tuple[int, int, str | None]]:
        """One forward pass over every running request: [(request id, token, finish)].

        token is the new output token, or -1 when the step ended the request without one;
        finish is None while it runs, else "stop" (a stop token was sampled, not output),
        "length" (max_new_tokens reached; the event carries the last token) or "cancelled".
        Returns [] when there is nothing to do. One caller at a time (the GIL is released).
        """
        return self._engine.step()

    def cancel(self, request_id: int) -> None:
        """End a request from any thread; its KV region is freed at once (or by the step in flight).
        Unknown or finished ids are ignored."""
        self._engine.cancel_request(int(request_id))

    def cancel_all(self) -> None:
        """Cancel every submitted request and make generate()/logits() calls in flight return."""
        self._engine.cancel()

    def stats(self) -> dict:
        """running, queued, max_batch, kv_regions_used, kv_bytes, kv_bytes_used, tokens_generated,
        requests_finished, steps. Thread-safe (a short lock; it never waits for a step)."""
        return self._engine.stats()

    @property
    def has_work(self) -> bool:
        return self._engine.has_work

    @property
    def prefill_chunk(self) -> int:
        return self._engine.prefill_chunk

    @property
    def step_tokens(self) -> int:
        return self._engine.step_tokens

    def logits(self, ids: Sequence[int], chunk: int = 0) -> np.ndarray:
        """float32 logits of every position, shape [len(ids), vocab].

        chunk: tokens per forward pass; 0 = chunks of step_tokens, 1 = one token at a time
        through the KV cache, exactly as decoding runs.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        chunk = _int_arg("chunk", chunk, 0, _INT32_MAX, " (0 = the prefill chunk)")
        return self._engine.logits(ids, chunk)


DEFAULT_MAX_SEQ, DEFAULT_PREFILL_CHUNK = 2048, 64  # csrc/engine.cpp's kDefaultMaxSeq, kDefaultPrefillChunk


def kv_bytes_per_sequence(model, max_seq: int | None = None, skip_layers=(), kv_dtype: str = "fp32", *,
                          max_batch: int = 1, prefill_chunk: int | None = None, step_tokens: int | None = None) -> int:
    """KV-cache bytes one running sequence holds (its region), as the runtime allocates them: K and V in
    kv_dtype (int8 with its row scales) for every retained attention of the plan, at max_seq positions (None =
    the engine's default), except Gemma 3's sliding_attention layers, whose region is a ring of
    min(max_seq, sliding_window + step_tokens - 1) positions (a step's rows are written before its attention
    reads the window). step_tokens (None = max_batch + prefill_chunk, prefill_chunk None = 64, at most
    max_seq) is the engine's; so for a model with sliding layers the figure grows with max_batch."""
    from . import _C

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r} (expected one of {', '.join(KV_DTYPES)})")
    m = checkpoint.load(model)
    cfg = m.model_config
    seq = max_seq if max_seq is not None else min(cfg.max_position, DEFAULT_MAX_SEQ)
    step = step_tokens or max_batch + min(prefill_chunk or DEFAULT_PREFILL_CHUNK, seq)
    ring = min(seq, cfg.sliding_window + step - 1)
    positions = sum(ring if cfg.is_sliding(s.index) else seq for s in m.plan(skip_layers or ()) if s.attention)
    return 2 * positions * cfg.n_kv_heads * _C.kv_row_bytes(kv_dtype, cfg.head_dim)


def max_batch_for_kv_budget(model, budget_bytes: int, max_seq: int | None = None, skip_layers=(),
                            kv_dtype: str = "fp32", prefill_chunk: int | None = None,
                            step_tokens: int | None = None, most: int = 4096) -> int:
    """The most sequences (up to `most`) whose KV regions fit in budget_bytes (0 when not even one does):
    max_batch * kv_bytes_per_sequence(max_batch=max_batch, ...) <= budget_bytes, which grows with max_batch."""
    def total(b):
        return b * kv_bytes_per_sequence(model, max_seq, skip_layers, kv_dtype, max_batch=b,
                                         prefill_chunk=prefill_chunk, step_tokens=step_tokens)

    lo, hi = 0, most
    while lo < hi:  # the largest b with total(b) <= budget_bytes
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid - 1)
    return lo


_ENGINES: dict[tuple, TextEngine] = {}


def generate(model, prompt_or_prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop=None, chat: bool = False, dtype: str | None = None,
             threads: int | None = None, kv_dtype: str | None = None, device: str = "cpu"):
    """Text continuation(s) from a model: an Engine (or GpuEngine), or a path / "default" / Model
    (an engine is built once per (checkpoint, device, dtype, threads, kv_dtype) and reused).
    device "cuda" runs the GPU engine (dtype default "bf16"; the CPU's default is "fp32")."""
    if isinstance(model, TextEngine):
        engine = model
    else:
        if device != "cpu":
            from .devices import resolve_device

            resolve_device(device)  # before the checkpoint is loaded
        path = checkpoint.load(model).path
        key = (str(path), device, dtype, threads, kv_dtype)
        engine = _ENGINES.get(key)
        if engine is None:
            options = {k: v for k, v in (("dtype", dtype), ("kv_dtype", kv_dtype)) if v is not None}
            engine = _ENGINES[key] = Engine(path, threads=threads, max_batch=4, device=device, **options)
    return engine.generate(prompt_or_prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop=stop, chat=chat)
