"""Text sources for calibration and evaluation, as lists of documents.

A source spec is one of:
    python-stdlib                     the running interpreter's standard library (tests excluded)
    LANG:DIR                          source files of one language under DIR, e.g. java:~/src/jdk
    LANG:FILE.zip[/PREFIX]            the same inside a zip archive, e.g. java:$JDK/lib/src.zip/java.base
    code-ppl                          (evaluation) every language corpus present here, see code_corpora()
    FILE.txt / FILE.jsonl             plain text (cut into 200-line documents) / one document a line
    hf:NAME[:CONFIG]:SPLIT:FIELD      a Hugging Face dataset (needs `pip install codeprune[hf]`)

Documents carry a stable id (a relative path, a line number, a row index): the
held-out split is decided from that id alone, so it never depends on the seed.
Binary and non-UTF-8 files are skipped and counted, never fatal.

Memory stays bounded whatever the input: a document keeps at most MAX_DOC_BYTES
(1 MiB) of UTF-8 text. A longer file, row or line is truncated (at its last
newline in the final half MiB when there is one, else at a character boundary)
and recorded in ``Corpus.truncated``; a FILE.txt is read line by line and a new
document starts before one would pass the cap, so a 30 MB single-line file costs
1 MiB, not 30 MB (and the tokenizer never sees it whole: data/calibration.py).
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.errors import ConfigError, CorpusError

LANGUAGES: dict[str, tuple[str, ...]] = {
    "python": (".py",),
    "java": (".java",),
    "cpp": (".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx", ".h", ".tcc", ""),
    "c": (".c", ".h"),
    "javascript": (".js", ".mjs", ".cjs"),
    "typescript": (".ts", ".tsx"),
    "go": (".go",),
    "rust": (".rs",),
}
# C++ standard headers have no extension (<vector>); for cpp an extension-less
# file counts only when its first bytes look like C++ (see _looks_like_cpp).

MAX_FILE_BYTES = 2_000_000  # larger files of a folder or zip are skipped (generated code, minified bundles)
MAX_DOC_BYTES = 1 << 20  # a document keeps at most this much UTF-8 text; longer ones are truncated
MAX_JSONL_LINE_BYTES = 4 * MAX_DOC_BYTES  # longer .jsonl lines are skipped unparsed (too_large)
TXT_DOC_LINES = 200
_HEAD_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file


@dataclass
class Document:
    id: str
    text: str


@dataclass
class Corpus:
    """The documents of one source, with what was skipped while reading it."""

    spec: str
    documents: list[Document]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: dict[str, int] = field(default_factory=dict)  # document id -> its size in bytes before the cap
    empty: int = 0  # documents left out because they hold only white space

    def __len__(self) -> int:
        return len(self.documents)


def read_source(spec: str, *, text_field: str = "text") -> Corpus:
    """Read the documents of a source spec (see the module docstring)."""
    if not spec or not spec.strip():
        raise ConfigError("empty data source: use python-stdlib, LANG:DIR, FILE.txt, FILE.jsonl or hf:...")
    if spec == "python-stdlib":
        corpus = _read_dir(spec, python_stdlib_dir(), "python", exclude=is_stdlib_test)
    elif spec.startswith("hf:"):
        corpus = _read_hf(spec, text_field)
    elif spec.split(":", 1)[0] in LANGUAGES and ":" in spec:
        lang, folder = spec.split(":", 1)
        if not folder.strip():
            raise ConfigError(f"data source '{spec}' names no folder: use {lang}:DIR")
        root = Path(folder).expanduser()
        archive, prefix = _split_zip(root)
        if archive is not None:
            corpus = _read_zip(spec, archive, prefix, lang)
        elif not root.is_dir():
            raise CorpusError(f"corpus folder not found: {folder}")
        else:
            corpus = _read_dir(spec, root, lang)
    elif spec.endswith((".txt", ".jsonl")):
        corpus = _read_file(spec, Path(spec).expanduser(), text_field)
    else:
        raise ConfigError(
            f"unknown data source '{spec}': use python-stdlib, LANG:DIR (LANG one of "
            f"{', '.join(LANGUAGES)}), FILE.txt, FILE.jsonl or hf:NAME[:CONFIG]:SPLIT:FIELD"
        )
    corpus.documents = [_capped(d, corpus.truncated) for d in corpus.documents]
    kept = [d for d in corpus.documents if d.text.strip()]
    corpus.empty, corpus.documents = len(corpus.documents) - len(kept), kept
    if not corpus.documents:
        raise CorpusError(f"data source '{spec}' holds no usable text ({describe_reading(corpus)})")
    return corpus


def describe_reading(corpus: Corpus) -> str:
    """What reading left out or cut, in words: '1 document of 30.0 MB truncated to 1 MiB; 2 empty
    documents left out; files skipped: 3 binary' ('nothing skipped' when nothing was)."""
    parts = []
    if corpus.truncated:
        n, top = len(corpus.truncated), max(corpus.truncated.values())
        parts.append(f"{n} document{'s' * (n > 1)} of up to {top / 1e6:.1f} MB truncated to "
                     f"{MAX_DOC_BYTES / (1 << 20):g} MiB")
    if corpus.empty:
        parts.append(f"{corpus.empty} empty document{'s' * (corpus.empty > 1)} left out")
    if corpus.skipped:
        parts.append("files skipped: " + ", ".join(f"{n} {r.replace('_', ' ')}"
                                                    for r, n in sorted(corpus.skipped.items())))
    return "; ".join(parts) or "nothing skipped"


def _capped(doc: Document, truncated: dict[str, int]) -> Document:
    """``doc`` with at most MAX_DOC_BYTES of text (a longer one is recorded in ``truncated``)."""
    if len(doc.text) <= MAX_DOC_BYTES // 4:  # 4 bytes a character at most: surely under the cap
        return doc
    data = doc.text.encode("utf-8")
    if len(data) <= MAX_DOC_BYTES:
        return doc
    truncated[doc.id] = len(data)
    return Document(doc.id, _cut(data).decode("utf-8"))


def _cut(data: bytes, cap: int = MAX_DOC_BYTES) -> bytes:
    """The first ``cap`` bytes of UTF-8 ``data``, ending at its last newline in the final half
    when there is one, else at a character boundary (never inside a multi-byte character)."""
    if len(data) <= cap:
        return data
    end = cap
    while end > 0 and data[end] & 0xC0 == 0x80:  # data[end] continues a character: back off
        end -= 1
    newline = data.rfind(b"\n", cap // 2, end)
    return data[:newline + 1] if newline >= 0 else data[:end]


def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_stdlib_test(rel: Path) -> bool:
    """Whether a standard-library file (path relative to the library) is a test or site-packages."""
    parts = rel.parts
    return (
        any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages") for p in parts[:-1])
        or parts[-1].startswith("test_")
    )


_SKIP_DIRS = {"__pycache__", "node_modules", ".git"}
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def _read_dir(spec: str, root: Path, lang: str, exclude=None) -> Corpus:
    exts = LANGUAGES[lang]
    docs, skipped = [], {}
    for path in _walk(root, _SKIP_DIRS | (_STDLIB_SKIP_DIRS if exclude else set())):
        rel = path.relative_to(root)
        if path.suffix not in exts or (exclude and exclude(rel)):
            continue
        reason, text = _read_text(path)
        if reason is None and path.suffix == "" and not _looks_like_cpp(text):
            continue
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        docs.append(Document(str(rel), text))
    return Corpus(spec, docs, skipped)


def _split_zip(path: Path) -> tuple[Path | None, str]:
    """(archive, prefix inside it) when ``path`` is or continues a .zip file, else (None, "")."""
    parts = path.parts
    for i, part in enumerate(parts):
        if part.lower().endswith(".zip"):
            archive = Path(*parts[:i + 1])
            if archive.is_file():
                return archive, "/".join(parts[i + 1:])
    return None, ""


def _read_zip(spec: str, archive: Path, prefix: str, lang: str) -> Corpus:
    exts = LANGUAGES[lang]
    docs, skipped = [], {}
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    try:
        with zipfile.ZipFile(archive) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                name = info.filename
                if info.is_dir() or not name.startswith(prefix) or Path(name).suffix not in exts:
                    continue
                if any(p in _SKIP_DIRS or p.startswith(".") for p in name.split("/")[:-1]):
                    continue
                if info.file_size > MAX_FILE_BYTES:
                    skipped["too_large"] = skipped.get("too_large", 0) + 1
                    continue
                reason, text = _decode(z.read(info))
                if reason is None and Path(name).suffix == "" and not _looks_like_cpp(text):
                    continue
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                docs.append(Document(name[len(prefix):], text))
    except (OSError, zipfile.BadZipFile) as e:
        raise CorpusError(f"cannot read zip archive {archive}: {e}") from e
    return Corpus(spec, docs, skipped)


def code_corpora() -> dict[str, str]:
    """{language: source spec} of the code corpora present on this machine (the ``code-ppl`` suite).

    python: the interpreter's standard library; java: the JDK's sources (java.base of
    lib/src.zip, newest JDK under /usr/lib/jvm or $JAVA_HOME); cpp: the newest
    libstdc++ headers under /usr/include/c++; javascript: the packages npm ships
    (the global node_modules/npm/node_modules). A language whose corpus is missing
    is left out."""
    found = {"python": "python-stdlib"}
    jdks = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    jdks += sorted(Path("/usr/lib/jvm").glob("*"), key=_version_key, reverse=True)
    for jdk in jdks:
        z = jdk / "lib" / "src.zip"
        if z.is_file():
            found["java"] = f"java:{z.resolve()}/java.base"
            break
    cpp = sorted(Path("/usr/include/c++").glob("[0-9]*"), key=_version_key, reverse=True)
    if cpp:
        found["cpp"] = f"cpp:{cpp[0]}"
    for root in ("/usr/lib/node_modules/npm/node_modules", "/usr/local/lib/node_modules/npm/node_modules"):
        if Path(root).is_dir():
            found["javascript"] = f"javascript:{root}"
            break
    return found


def _version_key(path: Path) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path.name)[:3])


def _walk(root: Path, skip_dirs: set[str]):
    """Files under root in sorted order, not descending into hidden or skipped folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_text(path: Path) -> tuple[str | None, str]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return "too_large", ""
        data = path.read_bytes()
    except OSError:
        return "unreadable", ""
    return _decode(data)


def _decode(data: bytes) -> tuple[str | None, str]:
    if b"\0" in data[:8192]:
        return "binary", ""
    try:
        return None, data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", ""


def _looks_like_cpp(text: str) -> bool:
    head = text[:4000]
    return "#include" in head or "#pragma" in head or "namespace " in head or "#ifndef" in head


def _read_file(spec: str, path: Path, text_field: str) -> Corpus:
    """A FILE.txt or FILE.jsonl, read line by line (never a whole line over the caps in memory)."""
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    corpus = Corpus(spec, [])
    try:
        with path.open("rb") as f:
            if b"\0" in f.read(_HEAD_BYTES):
                raise CorpusError(f"corpus file {path} is binary")
            f.seek(0)
            if path.suffix == ".txt":
                _read_txt(f, path, corpus)
            else:
                _read_jsonl(f, path, text_field, corpus)
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e
    return corpus


def _lines(f, cap: int):
    """(bytes, size) of each line of the binary file ``f``, newline kept: a line over ``cap``
    bytes comes cut (``_cut``) with its full size, its rest read in pieces and dropped."""
    while line := f.readline(cap + 1):
        if len(line) <= cap:
            yield line, len(line)
            continue
        size, tail = len(line), line
        while not tail.endswith(b"\n"):
            tail = f.readline(1 << 16)
            if not tail:
                break
            size += len(tail)
        yield _cut(line, cap), size


def _utf8(data: bytes, path: Path, n: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file {path} is not utf8 (line {n})") from None


def _read_txt(f, path: Path, corpus: Corpus) -> None:
    """Documents of TXT_DOC_LINES lines (lines as ``str.splitlines`` counts them), a new one
    started early rather than pass MAX_DOC_BYTES; a longer line is cut to the cap."""
    lines, size, start, n = [], 0, 1, 0
    for n_phys, (data, full) in enumerate(_lines(f, MAX_DOC_BYTES), start=1):
        for line in _utf8(data, path, n_phys).splitlines(keepends=True):
            n, nbytes = n + 1, len(line.encode("utf-8"))
            if lines and (len(lines) == TXT_DOC_LINES or size + nbytes > MAX_DOC_BYTES):
                corpus.documents.append(Document(f"{path.name}:{start}", "".join(lines)))
                lines, size, start = [], 0, n
            lines.append(line)
            size += nbytes
        if full > len(data):
            corpus.truncated[f"{path.name}:{start}"] = full
    if lines:
        corpus.documents.append(Document(f"{path.name}:{start}", "".join(lines)))


def _read_jsonl(f, path: Path, text_field: str, corpus: Corpus) -> None:
    """One document a line (split on newlines only: JSON strings may hold U+2028); lines over
    MAX_JSONL_LINE_BYTES are skipped unparsed."""
    skipped = corpus.skipped
    for n, (data, full) in enumerate(_lines(f, MAX_JSONL_LINE_BYTES), start=1):
        if full > len(data):
            skipped["too_large"] = skipped.get("too_large", 0) + 1
            continue
        line = _utf8(data, path, n)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped["bad_json"] = skipped.get("bad_json", 0) + 1
            continue
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            skipped["no_field"] = skipped.get("no_field", 0) + 1
            continue
        corpus.documents.append(Document(f"{path.name}:{n}", value))
    if not corpus.documents and skipped.get("no_field"):
        raise CorpusError(f"no line of {path} has a string field '{text_field}' (see --text-field)")


def load_hf_dataset(name: str, config: str | None, split: str):
    """``datasets.load_dataset``, with codeprune's errors (no datasets package, offline, bad name)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("hf: sources need the datasets package: pip install 'codeprune[hf]'") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad split: all user-facing
        raise CorpusError(f"cannot load dataset {name} ({split}): {str(e).splitlines()[0][:200]}") from e


def _read_hf(spec: str, text_field: str) -> Corpus:
    parts = spec.split(":")[1:]
    if len(parts) == 3:
        name, config, split, fld = parts[0], None, parts[1], parts[2]
    elif len(parts) == 4:
        name, config, split, fld = parts
    else:
        raise ConfigError(f"bad dataset spec '{spec}': use hf:NAME[:CONFIG]:SPLIT:FIELD")
    ds = load_hf_dataset(name, config, split)
    if fld not in ds.column_names:
        raise CorpusError(f"dataset {name} has no field '{fld}' (fields: {', '.join(ds.column_names)})")
    docs = [Document(f"{name}:{split}:{i}", t) for i, t in enumerate(ds[fld]) if isinstance(t, str)]
    return Corpus(spec, docs, {})
