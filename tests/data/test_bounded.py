"""Documents are read and tokenized in bounded memory (data/sources.py, data/calibration.py).

A 30 MB single-line file once cost 9.3 GB and 100 s, then a misleading error; now
it is cut to MAX_DOC_BYTES, tokenized in pieces, and the error says what was found.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codeprune.data import calibration as cal
from codeprune.data import calibration_windows, heldout_windows, read_source
from codeprune.data.calibration import split_documents, unit_hash
from codeprune.data.sources import MAX_DOC_BYTES, MAX_JSONL_LINE_BYTES, Corpus, Document, _cut
from codeprune.errors import CorpusError

ROOT = Path(__file__).resolve().parents[2]
LINE = "x = foo(1, 2) + bar; "


def _one_line_file(path: Path, size: int) -> Path:
    with path.open("w") as f:
        for _ in range(size // len(LINE)):
            f.write(LINE)
    return path


def test_30mb_single_line_calibration_is_bounded(tmp_path: Path):
    """The whole path (read, split, tokenize, error) in a child process: peak memory growth
    and time stay small (the unbounded code needed ~9 GB with this tokenizer)."""
    path = _one_line_file(tmp_path / "calib.txt", 30_000_000)
    script = textwrap.dedent(f"""
        import resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests.conftest import _tokenizer
        from codeprune.data import calibration_windows, read_source
        from codeprune.errors import CorpusError
        tok = _tokenizer()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            calibration_windows(tok, read_source({str(path)!r}), samples=4, seq_len=64)
            message = "no error"
        except CorpusError as e:
            message = str(e)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(grown, time.perf_counter() - start)
        print(message)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    figures, message = out.stdout.strip().splitlines()[-2:]
    grown_kib, seconds = figures.split()
    assert int(grown_kib) < 1.5 * 1024 * 1024, f"peak memory grew {int(grown_kib) // 1024} MiB"
    assert float(seconds) < 20
    assert "1 document (0 held out), 65 tokens" in message
    assert "each document gives at most 64 tokens" in message
    assert "1 document of up to 30.0 MB truncated to 1 MiB" in message
    assert "need samples x seq_len = 4 x 64 = 256" in message


def test_long_line_is_cut_and_recorded(tmp_path: Path):
    path = tmp_path / "big.txt"
    path.write_text("first line\n" + LINE * (3 * MAX_DOC_BYTES // len(LINE)) + "\nlast line\n")
    corpus = read_source(str(path))
    assert all(len(d.text.encode()) <= MAX_DOC_BYTES for d in corpus.documents)
    assert [d.id for d in corpus.documents] == ["big.txt:1", "big.txt:2", "big.txt:3"]
    assert corpus.documents[0].text == "first line\n" and corpus.documents[2].text == "last line\n"
    assert set(corpus.truncated) == {"big.txt:2"} and corpus.truncated["big.txt:2"] > 3_000_000


def test_txt_document_closes_before_the_cap(tmp_path: Path):
    line = "y" * (MAX_DOC_BYTES // 3) + "\n"
    path = tmp_path / "wide.txt"
    path.write_text(line * 5)
    corpus = read_source(str(path))
    assert [d.id for d in corpus.documents] == ["wide.txt:1", "wide.txt:3", "wide.txt:5"]
    assert "".join(d.text for d in corpus.documents) == line * 5 and not corpus.truncated


def test_txt_lines_are_counted_as_before(tmp_path: Path):
    """Form feeds and CR line ends still count as lines (str.splitlines), so ids are unchanged."""
    lines = [f"l{i}\x0c" if i % 7 == 0 else f"l{i}\r\n" for i in range(450)]
    path = tmp_path / "ff.txt"
    path.write_bytes("".join(lines).encode())
    text = path.read_bytes().decode()
    expect = text.splitlines(keepends=True)
    docs = read_source(str(path)).documents
    assert [d.id for d in docs] == [f"ff.txt:{s + 1}" for s in range(0, len(expect), 200)]
    assert "".join(d.text for d in docs) == text


def test_cut_keeps_whole_characters_and_prefers_a_newline():
    data = ("é" * 10).encode()  # 2 bytes each
    assert _cut(data, 5).decode() == "éé"
    assert _cut(b"abcde\nfgh", 8) == b"abcde\n"
    assert _cut(b"ab\ncdefgh", 8) == b"ab\ncdefg"  # the newline is not in the final half


def test_jsonl_rows_are_capped_and_huge_lines_skipped(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"text": "small"}) + "\n")
        f.write(json.dumps({"text": "z" * (2 * MAX_DOC_BYTES)}) + "\n")
        f.write(json.dumps({"text": "q" * (MAX_JSONL_LINE_BYTES + 10)}) + "\n")
        f.write(json.dumps({"text": "after"}) + "\n")
    corpus = read_source(str(path))
    assert [d.id for d in corpus.documents] == ["rows.jsonl:1", "rows.jsonl:2", "rows.jsonl:4"]
    assert len(corpus.documents[1].text) == MAX_DOC_BYTES
    assert corpus.truncated == {"rows.jsonl:2": 2 * MAX_DOC_BYTES} and corpus.skipped == {"too_large": 1}


def test_folder_files_are_capped(tmp_path: Path):
    (tmp_path / "big.py").write_text("a = 1\n" * (MAX_DOC_BYTES // 4))  # 1.5 MiB, under MAX_FILE_BYTES
    (tmp_path / "empty.py").write_text("\n\n")
    corpus = read_source(f"python:{tmp_path}")
    assert [d.id for d in corpus.documents] == ["big.py"] and corpus.empty == 1
    text = corpus.documents[0].text
    assert MAX_DOC_BYTES - 6 < len(text) <= MAX_DOC_BYTES and text.endswith("\n")
    assert corpus.truncated == {"big.py": 6 * (MAX_DOC_BYTES // 4)}


def test_non_utf8_txt_is_a_corpus_error(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(CorpusError, match="not utf8 .line 2"):
        read_source(str(path))


def test_single_document_always_calibrates():
    doc = next(Document(f"d{i}.txt:1", "x") for i in range(100) if unit_hash(f"d{i}.txt:1") < 0.1)
    calib, held = split_documents(Corpus("one", [doc]))
    assert calib == [doc] and held == []


def test_tokenizer_calls_stay_small(tiny_tokenizer, monkeypatch: pytest.MonkeyPatch):
    """No call sees more than _TOKENIZE_CHARS characters; every document gets the ids of a
    whole-document call (long ones in pieces cut where the tokenizer splits anyway)."""
    monkeypatch.setattr(cal, "_TOKENIZE_CHARS", 300)
    seen = []

    def spy(texts, **kw):
        seen.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
        return tiny_tokenizer(texts, **kw)

    docs = [Document(f"f{i}.py", f"def f{i}(x):\n    return x + {i}\n" * (i % 5 + 1)) for i in range(40)]
    docs.append(Document("long.py", "def g(x):\n    return x\n" * 100))
    got = list(cal._doc_tokens(spy, docs))
    assert max(seen) <= 300
    for doc, ids in zip(docs[:-1], got[:-1], strict=True):
        assert ids == tiny_tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    assert got[-1] == tiny_tokenizer(docs[-1].text, add_special_tokens=False)["input_ids"]  # clean cuts
    pieces = cal._pieces(docs[-1].text, 300)
    assert len(pieces) > 5 and "".join(pieces) == docs[-1].text and all(p.endswith("\n") for p in pieces)


@pytest.mark.parametrize("text", ["x = 1;" * 200, "    if a:\n        return b\n" * 40, "é" * 900])
def test_pieces_cover_the_text(text: str):
    pieces = cal._pieces(text, 256)
    assert "".join(pieces) == text and all(0 < len(p) <= 256 for p in pieces)


def test_heldout_shortfall_says_what_was_found(tiny_tokenizer):
    corpus = Corpus("few", [Document(f"f{i}.py", "def f(x):\n    return x\n") for i in range(3)])
    with pytest.raises(CorpusError, match=r"held-out split of 'few': 1 document \(2 for calibration\), "
                                          r"\d+ tokens \(nothing skipped\) -- less than one window of 512"):
        heldout_windows(tiny_tokenizer, corpus, seq_len=512, max_windows=4)


def test_calibration_shortfall_counts_skips(tiny_tokenizer, tmp_path: Path):
    (tmp_path / "a.py").write_text("def a():\n    return 1\n")
    (tmp_path / "b.py").write_bytes(b"\x00\x01binary")
    (tmp_path / "c.py").write_text("   \n")
    corpus = read_source(f"python:{tmp_path}")
    with pytest.raises(CorpusError) as err:
        calibration_windows(tiny_tokenizer, corpus, samples=8, seq_len=64)
    msg = str(err.value)
    assert "calibration split of" in msg and "1 document (0 held out)" in msg
    assert "1 empty document left out; files skipped: 1 binary" in msg
    assert "need samples x seq_len = 8 x 64 = 512" in msg and "give a larger corpus" in msg
