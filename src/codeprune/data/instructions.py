"""Instruction data for recovery (``codeprune recover``) and a builder from a codebase.

Formats read by ``read_instructions`` (each example becomes a list of chat messages):

    FILE.jsonl   one JSON object a line, either Alpaca style
                     {"instruction": ..., "input": ... (optional), "output": ...}
                 or chat style
                     {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
                 An optional "split" field ("train" / "eval") pins the example to a split.
    hf:NAME[:CONFIG]:SPLIT   a Hugging Face dataset with those fields (codeprune[hf]),
                 e.g. hf:sahil2801/CodeAlpaca-20k:train

``build_instructions("LANG:DIR")`` (``codeprune instructions --from LANG:DIR``)
turns a codebase into Alpaca-style pairs: for every function or method with a
docstring (Python) or a comment right above it (Java, JavaScript, C++: Javadoc,
``/* */`` or ``//`` lines), the cleaned docstring/comment is the instruction,
the signature the input, and the body (without the docstring, or the inside of
the braces; re-indented to 4 spaces, as HumanEval completions are) the output.
Test files (test_*, *_test.*, *Test.java, *.test.js, *.spec.js, *_unittest.cc,
conftest.py, anything under test/, tests/, testing/, __tests__/) are skipped;
pairs are deduplicated on their normalised text; the split is by file (a hash of
the file path), so no file feeds both the training and the evaluation split.
Python is parsed with the standard ``ast``; Java, JavaScript and C++ with
tree-sitter's grammars (``pip install 'codeprune[parsers]'``; a regex over
braces would not be reliable).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.data.calibration import unit_hash
from codeprune.data.sources import is_stdlib_test, load_hf_dataset, read_source
from codeprune.errors import ConfigError, CorpusError
from codeprune.outputs import check_output, write_file_atomically

ROLES = ("system", "user", "assistant")
EVAL_FRACTION = 0.05
MIN_DOCSTRING_CHARS = 12
MIN_BODY_LINES = 1


@dataclass
class Example:
    """One training example: chat messages, a stable id, and the split it is pinned to (or None)."""

    messages: list[dict]
    id: str
    split: str | None = None


@dataclass
class InstructionSet:
    spec: str
    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, eval_fraction: float = EVAL_FRACTION) -> tuple[list[Example], list[Example]]:
        """(train, eval): a pinned "split" always wins; the other examples are held out when
        the hash of their id falls under ``eval_fraction``. With a fraction > 0 at least one
        unpinned example is held out, and training keeps at least one example."""
        train, held = [], []
        for ex in self.examples:
            if ex.split is not None:
                (held if ex.split == "eval" else train).append(ex)
            elif eval_fraction > 0 and unit_hash(ex.id) < eval_fraction:
                held.append(ex)
            else:
                train.append(ex)
        free_train = sorted((e for e in train if e.split is None), key=lambda e: unit_hash(e.id))
        if eval_fraction > 0 and not held and len(free_train) > 1:
            train.remove(free_train[0])
            held.append(free_train[0])
        free_held = sorted((e for e in held if e.split is None), key=lambda e: unit_hash(e.id))
        if not train and free_held and len(held) > 1:
            held.remove(free_held[-1])
            train.append(free_held[-1])
        if not train:
            raise CorpusError(f"{self.spec}: no training example left after the evaluation split")
        return train, held


def to_messages(row: dict, where: str) -> list[dict]:
    """An Alpaca or chat row as chat messages; CorpusError naming ``where`` otherwise."""
    if "messages" in row:
        msgs = row["messages"]
        valid = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in msgs)
        if not valid:
            raise CorpusError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, "
                              "content: str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise CorpusError(f"{where}: no assistant message (nothing to learn)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        prompt = row["instruction"]
        if isinstance(row.get("input"), str) and row["input"].strip():
            prompt += "\n\n" + row["input"]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    raise CorpusError(f"{where}: expected instruction/output (Alpaca) or messages (chat) fields, "
                      f"got {', '.join(sorted(row)) or 'none'}")


def read_rows(spec: str) -> list[tuple[str, dict]]:
    """[(where, row)] of a .jsonl file or an ``hf:`` dataset, rows as they are (no checks
    beyond JSON objects); ConfigError / CorpusError when missing."""
    if not spec or not spec.strip():
        raise ConfigError("no instruction data: give --data FILE.jsonl or hf:NAME[:CONFIG]:SPLIT")
    if spec.startswith("hf:"):
        return _read_hf_rows(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CorpusError(f"instruction file not found: {spec}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{spec} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{spec} line {n}: expected a JSON object")
        rows.append((f"{spec} line {n}", row))
    return rows


def read_instructions(spec: str) -> InstructionSet:
    """Read an instruction set (see the module docstring); CorpusError when missing or empty."""
    rows = read_rows(spec)
    examples = []
    for where, row in rows:
        split = row.get("split")
        if split not in (None, "train", "eval"):
            raise CorpusError(f"{where}: split must be 'train' or 'eval', got {split!r}")
        key = row.get("id")  # else the content: the split never depends on where the file lives
        if key is None:
            key = hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()
        key = str(key)
        examples.append(Example(to_messages(row, where), key, split))
    if not examples:
        raise CorpusError(f"instruction data '{spec}' holds no example")
    return InstructionSet(spec, examples)


def _read_hf_rows(spec: str) -> list[tuple[str, dict]]:
    parts = spec.split(":")[1:]
    if len(parts) == 2:
        name, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise ConfigError(f"bad dataset spec '{spec}': use hf:NAME[:CONFIG]:SPLIT")

    ds = load_hf_dataset(name, config, split)
    return [(f"{name}:{split}:{i}", dict(row)) for i, row in enumerate(ds)]


# -- building pairs from a codebase ----------------------------------------------------

TEST_DIRS = {"test", "tests", "testing", "__tests__", "spec", "androidTest"}
TEST_NAME = re.compile(r"^(test_.*|.*_test\.\w+|.*_unittest\.\w+|.*Tests?\.java|Test[A-Z].*\.java"
                       r"|.*\.(test|spec)\.[cm]?js|conftest\.py)$")


def is_test_file(rel: str) -> bool:
    parts = Path(rel).parts
    return any(p in TEST_DIRS for p in parts[:-1]) or bool(TEST_NAME.match(parts[-1]))


def python_pairs(source: str, file_id: str) -> list[dict]:
    """Alpaca records (instruction = docstring, input = signature, output = body) of every
    documented function and method in ``source``; [] when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        body = node.body[1:] if doc is not None else []
        if doc is None or len(doc) < MIN_DOCSTRING_CHARS or not body:
            continue
        if len(body) == 1 and _is_stub(body[0]):
            continue
        signature = "\n".join(lines[node.lineno - 1:node.body[0].lineno - 1]).rstrip()
        signature = _signature(signature)
        text = "\n".join(lines[body[0].lineno - 1:node.end_lineno])
        code = textwrap.indent(textwrap.dedent(text), "    ").rstrip() + "\n"
        if len(code.strip().splitlines()) < MIN_BODY_LINES:
            continue
        out.append({"instruction": doc, "input": textwrap.dedent(signature), "output": code,
                    "source": f"{file_id}:{node.lineno}"})
    return out


def _is_stub(stmt: ast.stmt) -> bool:
    """``pass``, ``...`` or ``raise NotImplementedError``: nothing to learn from."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _signature(text: str) -> str:
    """The ``def`` line(s), up to the colon that opens the body."""
    match = re.search(r"^(\s*(?:async\s+)?def\b.*?\)\s*(?:->[^:]+)?:)", text, re.S | re.M)
    return match.group(1) if match else text.split("\n")[0]


# -- brace languages (tree-sitter) ------------------------------------------------------

BRACE_LANGUAGES = {  # language -> (grammar module, function node types)
    "java": ("tree_sitter_java", {"method_declaration", "constructor_declaration"}),
    "javascript": ("tree_sitter_javascript", {"function_declaration", "generator_function_declaration",
                                              "method_definition"}),
    "cpp": ("tree_sitter_cpp", {"function_definition"}),
}
COMMENTS = {"comment", "line_comment", "block_comment"}
WRAPPERS = {"export_statement", "template_declaration"}  # a leading comment sits before these


def _parser(lang: str):
    import importlib

    module, _ = BRACE_LANGUAGES[lang]
    try:
        from tree_sitter import Language, Parser

        grammar = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"instructions from {lang} need tree-sitter: "
                          "pip install 'codeprune[parsers]'") from None
    return Parser(Language(grammar.language()))


def clean_comment(text: str) -> str:
    """The words of a /** */, /* */ or // comment, without its delimiters and leading stars."""
    text = text.strip()
    if text.startswith("/*"):
        text = re.sub(r"^/\*+!?", "", text)
        text = re.sub(r"\*+/$", "", text)
        lines = [re.sub(r"^\s*\*? ?", "", line) for line in text.splitlines()]
    else:
        lines = [re.sub(r"^\s*//+!? ?", "", line) for line in text.splitlines()]
    return textwrap.dedent("\n".join(lines)).strip()


def _leading_comment(anchor, source: bytes) -> str | None:
    """The comment block right above ``anchor`` (no blank line between), cleaned."""
    parts, row, prev = [], anchor.start_point[0], anchor.prev_sibling
    while prev is not None and prev.type in COMMENTS and prev.end_point[0] >= row - 1:
        parts.append(source[prev.start_byte:prev.end_byte].decode("utf-8", "replace"))
        row, prev = prev.start_point[0], prev.prev_sibling
    return "\n".join(clean_comment(c) for c in reversed(parts)) if parts else None


def brace_pairs(lang: str, source: str, file_id: str, parser=None) -> list[dict]:
    """Alpaca records (instruction = leading comment, input = signature, output = the inside of
    the body's braces) of every commented function or method in ``source``."""
    parser = parser or _parser(lang)
    data = source.encode("utf-8")
    tree = parser.parse(data)
    kinds = BRACE_LANGUAGES[lang][1]
    out, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.children))
        body = node.child_by_field_name("body") if node.type in kinds else None
        if body is None or node.has_error:
            continue
        anchor = node
        while anchor.parent is not None and anchor.parent.type in WRAPPERS:
            anchor = anchor.parent
        doc = _leading_comment(anchor, data)
        if not doc or len(doc) < MIN_DOCSTRING_CHARS:
            continue
        inner = data[body.start_byte + 1:body.end_byte - 1].decode("utf-8", "replace")
        inner = inner.strip("\n").rstrip()
        if not inner.strip():
            continue
        signature = data[anchor.start_byte:body.start_byte].decode("utf-8", "replace").rstrip()
        signature = textwrap.dedent(" " * anchor.start_point[1] + signature).strip()
        code = textwrap.indent(textwrap.dedent(inner), "    ").rstrip() + "\n"
        out.append({"instruction": doc, "input": signature, "output": code,
                    "source": f"{file_id}:{anchor.start_point[0] + 1}"})
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def build_instructions(spec: str, *, eval_fraction: float = EVAL_FRACTION,
                       exclude=None) -> tuple[list[dict], dict]:
    """Instruction pairs from a codebase ``LANG:DIR`` (see the module docstring).

    Returns (records, summary): records carry instruction/input/output, "source"
    (file:line) and "split" (by file). ``exclude(relative path) -> bool`` skips more
    files (``python-stdlib`` is the interpreter's standard library without its tests
    and site-packages)."""
    lang = spec.split(":", 1)[0] if ":" in spec else spec
    if lang not in ("python", "python-stdlib", *BRACE_LANGUAGES):
        raise ConfigError(f"instructions --from takes python:DIR, {':DIR, '.join(BRACE_LANGUAGES)}:DIR "
                          f"(got '{spec}'): the languages with a parser codeprune trusts")
    parser = _parser(lang) if lang in BRACE_LANGUAGES else None
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if spec == "python-stdlib":
        corpus, exclude = read_source(spec), exclude or is_stdlib_test
    else:
        corpus = read_source(spec)
    seen, records = set(), []
    summary = {"files": 0, "test_files_skipped": 0, "pairs": 0, "duplicates": 0, "skipped": corpus.skipped}
    for doc in sorted(corpus.documents, key=lambda d: d.id):
        if is_test_file(doc.id) or (exclude is not None and exclude(Path(doc.id))):
            summary["test_files_skipped"] += 1
            continue
        summary["files"] += 1
        split = "eval" if unit_hash(doc.id) < eval_fraction else "train"
        pairs = brace_pairs(lang, doc.text, doc.id, parser) if parser else python_pairs(doc.text, doc.id)
        for rec in pairs:
            key = (_norm(rec["instruction"]), _norm(rec["output"]))
            if key in seen:
                summary["duplicates"] += 1
                continue
            seen.add(key)
            records.append({**rec, "split": split})
    if not records:
        raise CorpusError(f"{spec}: no documented function found outside test files")
    if eval_fraction > 0 and not any(r["split"] == "eval" for r in records):
        first = min({r["source"].rsplit(":", 1)[0] for r in records}, key=unit_hash)
        for r in records:  # at least one file held out, still whole files
            if r["source"].rsplit(":", 1)[0] == first:
                r["split"] = "eval"
    if eval_fraction > 0 and all(r["split"] == "eval" for r in records):
        for r in records:
            r["split"] = "train"  # a single file: nothing to hold out
    summary["pairs"] = len(records)
    summary["train"] = sum(r["split"] == "train" for r in records)
    summary["eval"] = summary["pairs"] - summary["train"]
    return records, summary


def check_jsonl_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing file (unless ``overwrite``), a folder at ``out``, or a place that
    cannot be written (outputs.check_output)."""
    return check_output(out, overwrite, kind="file")


def write_jsonl(records: list[dict], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``records`` one JSON object a line, atomically."""
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write_file_atomically(out, overwrite, lambda f: f.writelines(lines))
