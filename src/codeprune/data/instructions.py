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

Styles (``style``, ``codeprune instructions --style``):

``alpaca``      (default) the pairs above: docstring -> body.
``completion``  (Python) HumanEval-shaped chat pairs: the user turn asks for the
                function whose signature and docstring it shows, with exactly the
                words ``eval --humaneval --prompt-format instruct`` uses
                (data/prompts.py ``humaneval_messages``), and the answer is the
                whole function in a ```python block. Rendered with the model's chat
                template, the prompt followed by the answer's opening fence is the
                evaluation prompt, so recovery trains the format it is evaluated in.

Tests (``with_tests``, ``--with-tests``, Python): only module-level functions
whose docstring holds doctest examples (``>>>``) that call the function are
kept, and each pair carries them as its test: ``test`` (a program that runs the
examples with doctest against whatever the answer defined, exiting non-zero on
a failure), ``prompt_code`` (the context put before the answer: the module's
namespace when the interpreter can import it, else its top-level imports),
``problem`` (signature + docstring: a bare body answer continues it) and
``function``. ``codeprune instructions`` then runs every test in the sandbox
and keeps the pairs whose test passes with the reference function and fails
with a stub, so ``distill-data`` can judge answers by real tests.
"""

from __future__ import annotations

import ast
import doctest
import hashlib
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.data.calibration import unit_hash
from codeprune.data.prompts import RESPONSE_PREFIX, humaneval_messages
from codeprune.data.sources import is_stdlib_test, load_hf_dataset, read_source
from codeprune.errors import ConfigError, CorpusError
from codeprune.outputs import check_output, write_file_atomically

ROLES = ("system", "user", "assistant")
STYLES = ("alpaca", "completion")
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


def python_pairs(source: str, file_id: str, *, style: str = "alpaca", with_tests: bool = False,
                 module: str | None = None) -> list[dict]:
    """The records of every documented function and method in ``source`` (see the module
    docstring for ``style`` and ``with_tests``; ``module`` is the dotted name the file is
    imported as, for the tests' context); [] when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    top_level = {id(n) for n in tree.body}
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
        test = None
        if with_tests:
            examples = doctest_examples(doc, node.name) if id(node) in top_level else None
            if not examples:
                continue
            test = doctest_program(examples, node.name)
        signature = "\n".join(lines[node.lineno - 1:node.body[0].lineno - 1]).rstrip()
        signature = _signature(signature)
        text = "\n".join(lines[body[0].lineno - 1:node.end_lineno])
        code = textwrap.indent(textwrap.dedent(text), "    ").rstrip() + "\n"
        if len(code.strip().splitlines()) < MIN_BODY_LINES:
            continue
        problem = _dedent_block(lines[node.lineno - 1:node.body[0].end_lineno])
        if style == "completion":
            function = _dedent_block(lines[node.lineno - 1:node.end_lineno])
            rec = {"messages": humaneval_messages(problem)
                   + [{"role": "assistant", "content": f"{RESPONSE_PREFIX}{function}```"}]}
        else:
            rec = {"instruction": doc, "input": textwrap.dedent(signature), "output": code}
        rec["source"] = f"{file_id}:{node.lineno}"
        if test is not None:
            rec |= {"test": test, "prompt_code": module_context(tree, module), "problem": problem,
                    "function": node.name}
        out.append(rec)
    return out


def _dedent_block(lines: list[str]) -> str:
    return textwrap.dedent("\n".join(lines)).rstrip() + "\n"


def doctest_examples(doc: str, name: str) -> str | None:
    """The doctest examples of a docstring, as doctest source text (``>>>`` lines, their
    continuations and the expected output), when at least one of them calls ``name``;
    None otherwise (no examples, examples that never call the function, or a docstring
    doctest cannot parse)."""
    try:
        examples = doctest.DocTestParser().get_examples(doc, name)
    except ValueError:
        return None
    calls = re.compile(rf"(?<![\w.]){re.escape(name)}\s*\(")
    if not examples or not any(calls.search(ex.source) for ex in examples):
        return None
    parts = []
    for ex in examples:
        src = ex.source.rstrip("\n").split("\n")
        parts.append("\n".join([">>> " + src[0]] + ["... " + line for line in src[1:]]))
        if ex.want:
            parts.append(ex.want.rstrip("\n"))
    return "\n".join(parts) + "\n"


def doctest_program(examples: str, name: str) -> str:
    """The test of a pair: runs ``examples`` with doctest against the names the program
    defined before it (the context, then the answer); raises AssertionError when an example
    fails (the sandbox counts a program that ends cleanly as passed)."""
    return (f"import doctest as _doctest, sys as _sys\n"
            f"_test = _doctest.DocTestParser().get_doctest({examples!r}, dict(globals()), {name!r}, "
            f"None, 0)\n"
            f"_runner = _doctest.DocTestRunner(\n"
            f"    optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)\n"
            f"_runner.run(_test, out=_sys.stderr.write)\n"
            f"assert not _runner.failures, f'{{_runner.failures}} of {{_runner.tries}} examples failed'\n")


def module_context(tree: ast.Module, module: str | None) -> str:
    """What a pair's test puts before the answer: the module's namespace when the
    interpreter can import ``module`` (its helpers and constants), and its top-level
    absolute imports, each one skipped when it cannot be imported."""
    out = []
    if module:
        out.append(f"import importlib as _il\ntry:\n    globals().update({{k: v for k, v in "
                   f"vars(_il.import_module({module!r})).items() if not k.startswith('__')}})\n"
                   f"except Exception:\n    pass\n")
    for node in tree.body:
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not node.level
                                            and node.module != "__future__"):
            out.append(f"try:\n    {ast.unparse(node)}\nexcept Exception:\n    pass\n")
    return "".join(out)


def answer_code(text: str) -> str:
    """The code of an answer: its first fenced block, else the whole text."""
    m = re.search(r"```[\w+-]*\n(.*?)(```|$)", text, flags=re.S)
    return m.group(1) if m else text


def defines(code: str, name: str) -> bool:
    return bool(re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, flags=re.M))


def program_with_tests(row: dict, answer: str) -> str:
    """The program that checks ``answer`` against a row's test: ``prompt_code``, the answer's
    code (a bare body continues the row's ``problem``, as ``eval --humaneval`` continues a
    prompt), the ``test``, and ``check(entry_point)`` when the row names one (HumanEval's
    layout)."""
    code = answer_code(answer)
    name, problem = row.get("function"), row.get("problem")
    if name and problem and not defines(code, name):
        code = problem + code
    entry = row.get("entry_point")
    return ((row.get("prompt_code") or "") + code + "\n\n" + row["test"] + "\n\n"
            + (f"check({entry})\n" if entry else ""))


def reference_answer(row: dict) -> str:
    """The answer a record trains: the last message of a chat record, else its output."""
    return row["messages"][-1]["content"] if "messages" in row else row["output"]


def module_name(rel: str) -> str | None:
    """The dotted module name of a file path relative to an import root (``json/decoder.py``
    -> ``json.decoder``); None when a part is not an identifier."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


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


def build_instructions(spec: str, *, eval_fraction: float = EVAL_FRACTION, exclude=None,
                       style: str = "alpaca", with_tests: bool = False) -> tuple[list[dict], dict]:
    """Instruction pairs from a codebase ``LANG:DIR`` (see the module docstring).

    Returns (records, summary): records carry instruction/input/output (``alpaca``) or
    messages (``completion``), "source" (file:line), "split" (by file) and, with
    ``with_tests``, test/prompt_code/problem/function. ``exclude(relative path) -> bool``
    skips more files (``python-stdlib`` is the interpreter's standard library without its
    tests and site-packages)."""
    lang = spec.split(":", 1)[0] if ":" in spec else spec
    if lang not in ("python", "python-stdlib", *BRACE_LANGUAGES):
        raise ConfigError(f"instructions --from takes python:DIR, {':DIR, '.join(BRACE_LANGUAGES)}:DIR "
                          f"(got '{spec}'): the languages with a parser codeprune trusts")
    if style not in STYLES:
        raise ConfigError(f"unknown instruction style '{style}': use {' or '.join(STYLES)}")
    if lang in BRACE_LANGUAGES and (style == "completion" or with_tests):
        raise ConfigError(f"--style completion and --with-tests are for Python (HumanEval's format and "
                          f"doctests), not {lang}")
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
        pairs = brace_pairs(lang, doc.text, doc.id, parser) if parser else \
            python_pairs(doc.text, doc.id, style=style, with_tests=with_tests, module=module_name(doc.id))
        for rec in pairs:
            key = _norm(json.dumps(rec.get("messages") or [rec["instruction"], rec["output"]]))
            if key in seen:
                summary["duplicates"] += 1
                continue
            seen.add(key)
            records.append({**rec, "split": split})
    if not records:
        what = "function with doctest examples" if with_tests else "documented function"
        raise CorpusError(f"{spec}: no {what} found outside test files")
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
