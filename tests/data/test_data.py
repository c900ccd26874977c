"""The data layer: source specs, the id-based held-out split, calibration and held-out windows."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path, PurePath

import pytest
import torch

from codeprune.data import (
    Corpus,
    Document,
    calibration_windows,
    heldout_windows,
    read_source,
    split_documents,
)
from codeprune.errors import ConfigError, CorpusError

# -- sources ------------------------------------------------------------------


def test_python_stdlib_has_many_documents_and_no_tests():
    corpus = read_source("python-stdlib")
    assert corpus.spec == "python-stdlib"
    assert len(corpus) > 200
    ids = [d.id for d in corpus.documents]
    assert len(set(ids)) == len(ids)
    for doc_id in ids:
        parts = PurePath(doc_id).parts
        assert doc_id.endswith(".py"), doc_id
        assert not {"test", "tests"} & set(parts[:-1]), doc_id
        assert not parts[-1].startswith("test_"), doc_id
    assert all(d.text.strip() for d in corpus.documents)
    assert "argparse.py" in ids


def test_python_stdlib_excludes_test_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The exclusion rules on a fake stdlib tree (the real one may have no test_*.py outside
    test folders)."""
    files = {
        "os.py": True,
        "json/__init__.py": True,
        "json/decoder.py": True,
        "unittest/case.py": True,
        "unittest/test/test_case.py": False,
        "unittest/test/support.py": False,
        "test/regrtest.py": False,
        "lib2to3/tests/data.py": False,
        "idlelib/idle_test/htest.py": False,
        "site-packages/pkg/mod.py": False,
        "test_fake.py": False,
        "json/test_json.py": False,
        "json/tests.py": True,  # a module named tests, not a tests folder
        "latest/mod.py": True,  # "test" only as a substring
        "json/__pycache__/decoder.py": False,
    }
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\nx = 1\n")
    monkeypatch.setattr("codeprune.data.sources.python_stdlib_dir", lambda: tmp_path)
    corpus = read_source("python-stdlib")
    expected = sorted(str(Path(rel)) for rel, keep in files.items() if keep)
    assert sorted(d.id for d in corpus.documents) == expected


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "b.py").write_text("class B:\n    pass\n")
    (root / "blob.py").write_bytes(b"\x7fELF\x00\x01\x02\x00binary")
    (root / "latin.py").write_bytes(b"x = '\xff\xfe\xfa'\n")
    (root / "Main.java").write_text("class Main { }\n")
    return root


def test_lang_dir_reads_valid_files_and_counts_skipped(mixed_dir: Path):
    corpus = read_source(f"python:{mixed_dir}")
    assert corpus.spec == f"python:{mixed_dir}"
    assert sorted(d.id for d in corpus.documents) == ["a.py", str(Path("pkg", "b.py"))]
    texts = {d.id: d.text for d in corpus.documents}
    assert texts["a.py"] == "def a():\n    return 1\n"
    assert corpus.skipped == {"binary": 1, "not_utf8": 1}


def test_lang_dir_other_language(mixed_dir: Path):
    corpus = read_source(f"java:{mixed_dir}")
    assert [d.id for d in corpus.documents] == ["Main.java"]
    assert corpus.documents[0].text == "class Main { }\n"
    assert corpus.skipped == {}


def test_jsonl_default_field_and_bad_lines(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"text": "first doc"}),
        "{not json",
        json.dumps({"text": "second doc", "code": "ignored"}),
        "",
        json.dumps({"other": "no text here"}),
        json.dumps({"text": "third doc"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    corpus = read_source(str(path))
    assert [(d.id, d.text) for d in corpus.documents] == [
        ("rows.jsonl:1", "first doc"),
        ("rows.jsonl:3", "second doc"),
        ("rows.jsonl:6", "third doc"),
    ]
    assert corpus.skipped == {"bad_json": 1, "no_field": 1}


def test_jsonl_custom_text_field(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    rows = [{"code": "x = 1", "text": "a"}, {"code": "y = 2"}, {"text": "only text"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = read_source(str(path), text_field="code")
    assert [d.text for d in corpus.documents] == ["x = 1", "y = 2"]
    assert corpus.skipped == {"no_field": 1}


def test_jsonl_without_the_field_is_an_error(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(3)) + "\n")
    with pytest.raises(CorpusError, match="'text'"):
        read_source(str(path))
    with pytest.raises(CorpusError, match="'body'"):
        read_source(str(path), text_field="body")


def test_jsonl_lines_are_split_on_newlines_only(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "a = 'x\u2028y'"}, {"text": "b = 'caf\x85'"}, {"text": "c = 2"}]
    # ensure_ascii=False writes U+2028 and U+0085 unescaped, as JSON allows
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    corpus = read_source(str(path))
    assert [(d.id, d.text) for d in corpus.documents] == [
        ("rows.jsonl:1", rows[0]["text"]),
        ("rows.jsonl:2", rows[1]["text"]),
        ("rows.jsonl:3", rows[2]["text"]),
    ]
    assert corpus.skipped == {}


def test_txt_is_cut_into_200_line_documents(tmp_path: Path):
    path = tmp_path / "notes.txt"
    lines = [f"line {i}\n" for i in range(1, 451)]
    path.write_text("".join(lines))
    corpus = read_source(str(path))
    assert [d.id for d in corpus.documents] == ["notes.txt:1", "notes.txt:201", "notes.txt:401"]
    assert [d.text.count("\n") for d in corpus.documents] == [200, 200, 50]
    assert corpus.documents[1].text.startswith("line 201\n")
    assert "".join(d.text for d in corpus.documents) == "".join(lines)


def test_missing_folder_and_file_are_corpus_errors(tmp_path: Path):
    with pytest.raises(CorpusError, match="not found"):
        read_source(f"python:{tmp_path / 'nope'}")
    with pytest.raises(CorpusError, match="not found"):
        read_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="not found"):
        read_source(str(tmp_path / "nope.txt"))


def test_folder_without_files_of_the_language_is_a_corpus_error(tmp_path: Path):
    (tmp_path / "Main.java").write_text("class Main { }\n")
    (tmp_path / "readme.md").write_text("# hi\n")
    with pytest.raises(CorpusError, match="no usable text"):
        read_source(f"python:{tmp_path}")


@pytest.mark.parametrize("spec", ["foo", "hf:onlyname", "hf:a:b:c:d:e", "", "  "])
def test_bad_specs_are_config_errors(spec: str):
    with pytest.raises(ConfigError):
        read_source(spec)


# -- the held-out split ---------------------------------------------------------


def _docs(n: int, prefix: str = "doc") -> list[Document]:
    return [Document(f"{prefix}{i:03d}.py", f"x = {i}\n") for i in range(n)]


def test_split_is_disjoint_and_complete():
    docs = _docs(200)
    calib, held = split_documents(Corpus("t", docs))
    calib_ids, held_ids = {d.id for d in calib}, {d.id for d in held}
    assert not calib_ids & held_ids
    assert calib_ids | held_ids == {d.id for d in docs}
    assert len(calib) + len(held) == len(docs)
    assert 5 <= len(held) <= 40  # about 10 %


def test_split_depends_only_on_ids():
    docs = _docs(100)
    _, held = split_documents(Corpus("a", docs))
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    _, held2 = split_documents(Corpus("b", shuffled))
    assert {d.id for d in held2} == {d.id for d in held}
    # the text does not matter either
    renamed = [Document(d.id, d.text * 3 + "# other\n") for d in docs]
    _, held3 = split_documents(Corpus("c", renamed))
    assert {d.id for d in held3} == {d.id for d in held}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_split_both_sides_non_empty(n: int):
    for prefix in ("a", "b", "c", "d"):
        calib, held = split_documents(Corpus("t", _docs(n, prefix)))
        assert len(calib) >= 1 and len(held) >= 1
        assert len(calib) + len(held) == n


def test_split_single_document_goes_to_calibration():
    calib, held = split_documents(Corpus("t", _docs(1)))
    assert [d.id for d in calib] == ["doc000.py"] and held == []


# -- windows ----------------------------------------------------------------------

MARKER = re.compile(r"mk(\d{3})q")


def _marked_corpus(n: int = 60, repeats: int = 12) -> Corpus:
    """Documents whose text repeats a marker unique to the document (mk007q for doc 7)."""
    return Corpus("marked", [
        Document(f"file{i:03d}.py", " ".join([f"mk{i:03d}q"] * repeats) + "\n") for i in range(n)
    ])


def _index(doc_id: str) -> int:
    return int(doc_id[4:7])


def _markers(tokenizer, ids: torch.Tensor) -> set[int]:
    return {int(m) for m in MARKER.findall(tokenizer.decode(ids.flatten().tolist()))}


def test_calibration_windows_shape_and_dtype(tiny_tokenizer):
    calib = calibration_windows(tiny_tokenizer, _marked_corpus(), samples=6, seq_len=24, seed=0)
    assert calib.input_ids.shape == (6, 24)
    assert calib.input_ids.dtype == torch.int64
    assert (calib.samples, calib.seq_len) == (6, 24)
    assert calib.split == "calibration" and calib.seed == 0 and calib.source == "marked"
    assert 1 <= calib.n_documents <= 60
    assert int(calib.input_ids.min()) >= 0 and int(calib.input_ids.max()) < len(tiny_tokenizer)


def test_calibration_windows_seeded(tiny_tokenizer):
    corpus = _marked_corpus()
    a = calibration_windows(tiny_tokenizer, corpus, samples=6, seq_len=24, seed=3)
    b = calibration_windows(tiny_tokenizer, corpus, samples=6, seq_len=24, seed=3)
    c = calibration_windows(tiny_tokenizer, corpus, samples=6, seq_len=24, seed=4)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    # the input order of the documents does not matter, only the seed
    shuffled = corpus.documents[:]
    random.Random(1).shuffle(shuffled)
    d = calibration_windows(tiny_tokenizer, Corpus("marked", shuffled), samples=6, seq_len=24,
                            seed=3)
    assert torch.equal(a.input_ids, d.input_ids)


def test_calibration_seed_picks_the_documents(tiny_tokenizer):
    """The seed shuffles the documents: small samples of different seeds use different files."""
    corpus = _marked_corpus()
    seen = [_markers(tiny_tokenizer, calibration_windows(
        tiny_tokenizer, corpus, samples=2, seq_len=24, seed=s).input_ids) for s in range(4)]
    assert all(seen)
    assert len({frozenset(x) for x in seen}) > 1
    assert len(set().union(*seen)) > max(len(x) for x in seen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_calibration_never_uses_heldout_documents(tiny_tokenizer, seed: int):
    corpus = _marked_corpus()
    calib_docs, held_docs = split_documents(corpus)
    calib_idx = {_index(d.id) for d in calib_docs}
    held_idx = {_index(d.id) for d in held_docs}
    assert held_idx and calib_idx
    # ask for nearly all calibration tokens so that many documents are used
    calib = calibration_windows(tiny_tokenizer, corpus, samples=20, seq_len=32, seed=seed)
    seen = _markers(tiny_tokenizer, calib.input_ids)
    assert len(seen) >= 10
    assert seen <= calib_idx
    assert not seen & held_idx
    held = heldout_windows(tiny_tokenizer, corpus, seq_len=16, max_windows=None)
    held_seen = _markers(tiny_tokenizer, held.input_ids)
    assert held_seen and held_seen <= held_idx


def test_calibration_too_few_tokens(tiny_tokenizer):
    with pytest.raises(CorpusError, match="--samples"):
        calibration_windows(tiny_tokenizer, _marked_corpus(n=4, repeats=2), samples=64,
                            seq_len=512, seed=0)


@pytest.mark.parametrize("samples, seq_len", [(0, 16), (-1, 16), (4, 1), (4, 0)])
def test_calibration_bad_sizes(tiny_tokenizer, samples: int, seq_len: int):
    with pytest.raises(ConfigError):
        calibration_windows(tiny_tokenizer, _marked_corpus(), samples=samples, seq_len=seq_len)


def test_heldout_windows_deterministic(tiny_tokenizer):
    corpus = _marked_corpus(n=120)
    a = heldout_windows(tiny_tokenizer, corpus, seq_len=16, max_windows=4)
    shuffled = corpus.documents[:]
    random.Random(5).shuffle(shuffled)
    b = heldout_windows(tiny_tokenizer, Corpus("marked", shuffled), seq_len=16, max_windows=4)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.input_ids.shape == (4, 16) and a.input_ids.dtype == torch.int64
    assert a.split == "heldout" and a.seed is None


def test_heldout_windows_max_and_all(tiny_tokenizer):
    corpus = _marked_corpus(n=120)
    seq_len = 16
    _, held_docs = split_documents(corpus)
    held_docs = sorted(held_docs, key=lambda d: d.id)
    # each held-out document gives its first seq_len tokens plus one separator
    stream = sum(min(len(tiny_tokenizer(d.text, add_special_tokens=False)["input_ids"]), seq_len)
                 + 1 for d in held_docs)
    full = stream // seq_len
    assert full >= 3
    every = heldout_windows(tiny_tokenizer, corpus, seq_len=seq_len, max_windows=None)
    assert every.input_ids.shape == (full, seq_len)
    assert every.n_documents == len(held_docs)
    few = heldout_windows(tiny_tokenizer, corpus, seq_len=seq_len, max_windows=2)
    assert few.input_ids.shape == (2, seq_len)
    assert torch.equal(few.input_ids, every.input_ids[:2])
    many = heldout_windows(tiny_tokenizer, corpus, seq_len=seq_len, max_windows=full + 50)
    assert torch.equal(many.input_ids, every.input_ids)


def test_heldout_too_small(tiny_tokenizer):
    corpus = Corpus("small", [Document("a.py", "x = 1\n"), Document("b.py", "y = 2\n")])
    with pytest.raises(CorpusError, match="held-out"):
        heldout_windows(tiny_tokenizer, corpus, seq_len=512, max_windows=8)


@pytest.mark.parametrize("max_windows", [0, -1])
def test_heldout_max_windows_must_be_positive(tiny_tokenizer, max_windows: int):
    with pytest.raises(ConfigError, match="held-out windows"):
        heldout_windows(tiny_tokenizer, _marked_corpus(), seq_len=16, max_windows=max_windows)


def test_heldout_bad_seq_len(tiny_tokenizer):
    with pytest.raises(ConfigError):
        heldout_windows(tiny_tokenizer, _marked_corpus(), seq_len=1)


class _FakeDataset:
    column_names = ["content", "lang"]

    def __getitem__(self, field):
        return {"content": ["def a():\n    return 1\n", "x = 2\n", None], "lang": ["py"] * 3}[field]


def test_hf_dataset_spec(monkeypatch):
    """hf:NAME[:CONFIG]:SPLIT:FIELD goes through datasets.load_dataset (faked: no hub here)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: calls.append((name, config, split)) or _FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)

    corpus = read_source("hf:bigcode/the-stack-smol:data/python:train:content")
    assert calls == [("bigcode/the-stack-smol", "data/python", "train")]
    assert [d.text for d in corpus.documents] == ["def a():\n    return 1\n", "x = 2\n"]
    read_source("hf:org/name:test:content")
    assert calls[-1] == ("org/name", None, "test")
    with pytest.raises(CorpusError, match="no field 'body'"):
        read_source("hf:org/name:test:body")


def test_heldout_slices_skip_the_file_start(tiny_tokenizer):
    """Held-out slices sit at fixed pseudo-random offsets, not at every file's licence header."""
    header = "# Copyright (C) the authors. Licensed under the terms of the licence.\n" * 3
    body = "".join(f"x{j} = {j}\n" for j in range(60))
    docs = [Document(f"f{i}.py", header + body.replace("x", f"v{i}_")) for i in range(200)]
    corpus = Corpus("headers", docs)
    a = heldout_windows(tiny_tokenizer, corpus, seq_len=32, max_windows=8)
    b = heldout_windows(tiny_tokenizer, corpus, seq_len=32, max_windows=8)
    assert torch.equal(a.input_ids, b.input_ids)  # deterministic
    head = tiny_tokenizer(header, add_special_tokens=False)["input_ids"][:8]
    rows = [r.tolist() for r in a.input_ids]
    starts_with_header = sum(any(row[k:k + 8] == head for k in range(len(row) - 8)) for row in rows)
    assert starts_with_header < len(rows)


def test_zip_sources_with_prefix(tmp_path):
    import zipfile

    from codeprune.data.sources import read_source

    z = tmp_path / "src.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("java.base/java/util/List.java", "package java.util;\ninterface List {}\n")
        f.writestr("java.base/java/util/Map.java", "package java.util;\ninterface Map {}\n")
        f.writestr("java.desktop/java/awt/Frame.java", "package java.awt;\nclass Frame {}\n")
        f.writestr("java.base/README.txt", "not java")
        f.writestr("java.base/.hidden/X.java", "class X {}\n")
    everything = read_source(f"java:{z}")
    assert sorted(d.id for d in everything.documents) == [
        "java.base/java/util/List.java", "java.base/java/util/Map.java", "java.desktop/java/awt/Frame.java"]
    base = read_source(f"java:{z}/java.base")
    assert sorted(d.id for d in base.documents) == ["java/util/List.java", "java/util/Map.java"]
    (tmp_path / "bad.zip").write_bytes(b"PK but not a zip")
    with pytest.raises(CorpusError, match="zip"):
        read_source(f"java:{tmp_path / 'bad.zip'}")


def test_code_corpora_are_readable():
    from codeprune.data.sources import code_corpora, read_source

    found = code_corpora()
    assert found["python"] == "python-stdlib"
    for lang, spec in found.items():
        assert spec == "python-stdlib" or spec.startswith(f"{lang}:")
    if "javascript" in found:  # present on the dev/CI machines: npm's bundled packages
        assert len(read_source(found["javascript"])) > 50
