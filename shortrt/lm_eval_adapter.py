"""lm-evaluation-harness on the C++ runtime: the model type "shortrt" (tested with lm-eval 0.4.13).

Importing this module registers the model with lm-eval's registry, so the harness's own entry
points take it by name:

    import lm_eval, shortrt.lm_eval_adapter
    lm_eval.simple_evaluate(model="shortrt", model_args="pretrained=out/smollm2-p8,dtype=int8",
                            tasks=["arc_easy"])

`shortrt lm-eval MODEL --tasks ...` does the same from the command line, and
`python -m shortrt.lm_eval_adapter --model shortrt --model_args ... --tasks ...` runs lm-eval's own
command line with the model registered (every lm-eval option).

model_args: pretrained (a checkpoint directory, .gguf file or "default"), dtype, lm_head_dtype,
kv_dtype, threads, max_seq (the engine's context; default min(max_position_embeddings, 2048)),
max_length (the longest input scored, default max_seq), prefill_chunk, max_gen_toks (default 256).
batch_size is how many generate_until requests decode at once (the engine's max_batch).

What each request type does (the same as lm-eval's Hugging Face model, "hf", unless said):
- loglikelihood: the context and continuation are tokenized together and split where the
  context's own tokens end (lm-eval's TemplateLM); the input is the last max_length + 1 tokens
  of context + continuation without its last token, i.e. an over-long context is cut from the
  left. Each input runs once through Engine.logits; an input that is a prefix of another
  (the one-token answers of a multiple-choice question share all but their last token, and
  repeated requests are equal) takes its log-probabilities from the longer one's run, which
  gives the same bits (a position's logits do not depend on what follows or on the chunking).
  Log-softmax is taken in float64 from the engine's float32 logits. Inputs run one at a time
  (the engine has no batched logits call); its threads share each forward pass.
- loglikelihood_rolling: lm-eval's rolling windows of max_length tokens (context 1), the first
  conditioned on the tokenizer's BOS token (EOS when it has none), each scored as above.
- generate_until: requests are submitted to the engine's continuous batching (batch_size at
  once); the context is cut from the left to max_length - max_gen_toks tokens; a request
  ends at the model's EOS token, after max_gen_toks tokens, or as soon as its text contains
  one of `until`, and the text is cut before the first stop string. Greedy unless do_sample
  (then temperature, top_k, top_p and seed apply; seed + the request's index seeds each).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised where lm-eval is absent
    from .errors import MissingDependencyError

    raise MissingDependencyError("the lm-evaluation-harness adapter needs lm-eval: "
                                 "pip install lm-eval==0.4.13") from exc

from tqdm.auto import tqdm

from . import checkpoint
from .engine import Engine, _int_arg

logger = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"  # the version this adapter is tested with (setup.py's lm-eval extra)
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}


class ShortrtLM(TemplateLM):
    """An lm-eval model over a shortrt.Engine (see the module docstring for each request type).

    pretrained: what shortrt.Engine loads (ignored when `engine` is given). engine: an Engine
    to use as it is (its dtype, threads and max_seq). max_length: the longest input scored
    (default: the engine's max_seq). batch_size: generate_until requests decoded at once.
    """

    def __init__(self, pretrained="default", dtype: str = "fp32", lm_head_dtype: str = "auto",
                 kv_dtype: str = "fp32", threads: int | None = None, max_seq: int | None = None,
                 max_length: int | None = None, prefill_chunk: int | None = None, batch_size=1,
                 max_gen_toks: int = 256, engine: Engine | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown shortrt model argument(s) {sorted(unknown)}; known: pretrained, dtype, "
                             "lm_head_dtype, kv_dtype, threads, max_seq, max_length, prefill_chunk, batch_size, "
                             "max_gen_toks")
        if device not in (None, "cpu"):  # lm-eval's command line passes cuda:0 unless told otherwise
            logger.warning("the shortrt model runs on the CPU (the C++ runtime): device=%r is ignored", device)
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"batch_size must be a positive integer for the shortrt model (it is the number "
                                 f"of sequences decoded at once; 'auto' is not supported), got {batch_size!r}")
            batch_size = int(batch_size)
        self._batch_size = _int_arg("batch_size", batch_size, 1, 4096)
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1, 2**31 - 1)
        if engine is None:
            engine = Engine(pretrained, dtype=dtype, threads=threads, max_seq=max_seq, max_batch=self._batch_size,
                            prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype)
        self.engine = engine
        self._max_length = engine.max_seq if max_length is None else _int_arg("max_length", max_length, 1,
                                                                               engine.max_seq,
                                                                               " (the engine's max_seq)")
        self.tokenizer = checkpoint.load(engine.checkpoint_dir).tokenizer()
        cfg = engine.model.config()
        self._eos = _first(self.tokenizer.eos_token_id, cfg.get("eos_token_id"))
        self._bos = _first(self.tokenizer.bos_token_id, cfg.get("bos_token_id"))
        if self._eos is None and self._bos is None:
            raise ValueError(f"{engine.checkpoint_dir}: neither the tokenizer nor config.json names a BOS or EOS "
                             "token; lm-eval needs one to condition a text's first token on")
        self._truncation_warned = False

    # --- what lm-eval reads -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos if self._eos is not None else self._bos

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling text's first window) is conditioned on: BOS, else EOS."""
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.checkpoint_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The checkpoint's tokenizer with its own special-token default (as lm-eval's "hf" model)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template if chat_template not in (False, None) else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.engine.checkpoint_dir}: the tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        e = self.engine
        return {"model_path": str(e.checkpoint_dir), "dtype": e.dtype, "lm_head_dtype": e.lm_head_dtype,
                "kv_dtype": e.kv_dtype, "layers_run": e.num_layers, "max_seq": e.max_seq,
                "max_length": self.max_length}

    # --- scoring ------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(log p(continuation | context), greedy?)] for [(cache key, context ids, continuation ids)]."""
        L = self.max_length
        inputs, results = [], [None] * len(requests)
        for i, (_, ctx, cont) in enumerate(requests):
            cont = list(cont)
            if not cont:
                results[i] = (0.0, True)  # the empty string: probability 1
                inputs.append(None)
                continue
            if len(cont) > L:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the context of {L} tokens "
                                 "(max_length)")
            whole = list(ctx) + cont
            if len(whole) > L + 1:
                self._warn_truncation(f"a context of {len(ctx)} tokens and continuation of {len(cont)} exceed "
                                      f"max_length {L}: the context is cut from the left")
            inputs.append(tuple(whole[-(L + 1):-1]))
        # Group every input with the longest input it is a prefix of: in sorted order an input's
        # extensions, if any, follow it directly.
        order = sorted((i for i, x in enumerate(inputs) if x is not None), key=lambda i: inputs[i])
        groups: list[list[int]] = []  # [covering input's request, then the requests it serves]
        for i in reversed(order):
            if groups:
                cover = inputs[groups[-1][0]]
                if len(inputs[i]) <= len(cover) and cover[:len(inputs[i])] == inputs[i]:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        groups.sort(key=lambda g: -len(inputs[g[0]]))  # longest first, as lm-eval's models do
        bar = tqdm(total=len(requests), desc="shortrt loglikelihood", disable=disable_tqdm)
        bar.update(len(requests) - len(order))
        for group in groups:
            logits = self.engine.logits(list(inputs[group[0]]))
            for i in group:
                cont = requests[i][2]
                n = len(inputs[i])
                rows = logits[n - len(cont):n]
                results[i] = _score(rows, cont)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.update(len(group))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window,
                                 get_rolling_token_windows(token_list=self.tok_encode(string),
                                                           prefix_token=self.prefix_token_id,
                                                           max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        jobs = []  # (prompt ids, max_new_tokens, stop strings, sampling kwargs)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generate_until expects a dict of generation arguments, got {gen_kwargs!r}")
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            unknown = sorted(set(kw) - _GEN_KEYS)
            if unknown:
                raise ValueError(f"generation argument(s) {unknown} are not supported by the shortrt model; "
                                 f"supported: {', '.join(sorted(_GEN_KEYS))}")
            until = kw["until"]
            until = [until] if isinstance(until, str) else [s for s in (until or []) if s]
            max_new = int(kw["max_gen_toks"])
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                 f"{self.max_length}")
            ids = self.tok_encode(context)
            if len(ids) > room:
                self._warn_truncation(f"a generation context of {len(ids)} tokens exceeds max_length - max_gen_toks "
                                      f"= {room}: it is cut from the left")
                ids = ids[-room:]
            if not ids:
                ids = [self.prefix_token_id]
            sample = bool(kw.get("do_sample")) and float(kw.get("temperature", 0.0)) > 0
            sampling = dict(temperature=float(kw.get("temperature", 0.0)) if sample else 0.0,
                            top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0),
                            seed=int(kw.get("seed") or 0) + i if sample else 0)
            jobs.append((ids, max_new, until, sampling))
        out = self._run_generation(jobs, disable_tqdm)
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _run_generation(self, jobs, disable_tqdm: bool) -> list[str]:
        """Every job through the engine's submit/step loop, at most max_batch running at once."""
        from .engine import Detokenizer

        eng = self.engine
        results: list[str | None] = [None] * len(jobs)
        live = {}  # request id -> (job index, token ids, detokenizer, text so far)
        pending = iter(range(len(jobs)))
        bar = tqdm(total=len(jobs), desc="shortrt generate_until", disable=disable_tqdm)

        def submit_next() -> bool:
            j = next(pending, None)
            if j is None:
                return False
            ids, max_new, _, sampling = jobs[j]
            rid = eng.submit(ids, max_new_tokens=max_new, **sampling)
            live[rid] = [j, [], Detokenizer(self.tokenizer), ""]
            return True

        def finish(rid) -> None:
            j, tokens, _, _ = live.pop(rid)
            results[j] = _cut_at_stop(self.tok_decode(tokens), jobs[j][2])
            bar.update(1)

        try:
            while len(live) < eng.max_batch and submit_next():
                pass
            while live:
                for rid, token, why in eng.step():
                    state = live.get(rid)
                    if state is None:
                        continue
                    if token >= 0:
                        state[1].append(token)
                        state[3] += state[2].push(token)
                    stops = jobs[state[0]][2]
                    if why is None and stops and any(s in state[3] for s in stops):
                        eng.cancel(rid)  # its text already holds a stop string
                        why = "stopped"
                    if why is not None:
                        finish(rid)
                        submit_next()
        except BaseException:
            for rid in list(live):
                eng.cancel(rid)
            while eng.has_work:  # let the cancellations through so the engine is left idle
                eng.step()
            raise
        finally:
            bar.close()
        return results

    def _warn_truncation(self, message: str) -> None:
        if not self._truncation_warned:
            logger.warning("%s (shown once)", message)
            self._truncation_warned = True


def _first(*values):
    """The first value that is an id (a list's first element), or None."""
    for v in values:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None


def _score(rows: np.ndarray, targets) -> tuple[float, bool]:
    """(sum of log-softmax(rows)[t, targets[t]] in float64, whether each target is its row's argmax)."""
    targets = np.asarray(targets, dtype=np.int64)
    x = rows.astype(np.float64)
    peak = x.max(axis=1)
    lse = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
    picked = x[np.arange(len(targets)), targets] - lse
    return float(picked.sum()), bool((rows.argmax(axis=1) == targets).all())


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut]


if __name__ == "__main__":  # lm-eval's own command line, with "shortrt" registered (by the import below)
    import shortrt.lm_eval_adapter  # noqa: F401  (registering this copy too would clash with it)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
else:
    register_model("shortrt")(ShortrtLM)
