"""Instruction data: Alpaca / chat files, and pairs built from a codebase."""

import json

import pytest

from codeprune.cli import main
from codeprune.data.instructions import build_instructions, read_instructions, write_jsonl
from codeprune.errors import ConfigError, CorpusError, OutputExistsError

LIB = '''"""A module."""


def add(a, b):
    """Return the sum of a and b."""
    total = a + b
    return total


def undocumented(x):
    return x


def stub(x):
    """A stub that does nothing yet."""
    ...


class Box:
    def area(self, w: int, h: int) -> int:
        """Compute the area of a w by h box."""
        if w < 0 or h < 0:
            raise ValueError("negative side")
        return w * h
'''

TEST_FILE = '''def helper():
    """A documented helper inside a test file."""
    return 1
'''


@pytest.fixture
def codebase(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "lib.py").write_text(LIB)
    (root / "pkg" / "copy_of_lib.py").write_text(LIB)  # every pair a duplicate
    (root / "pkg" / "test_lib.py").write_text(TEST_FILE)
    (root / "pkg" / "lib_test.py").write_text(TEST_FILE)
    (root / "pkg" / "conftest.py").write_text(TEST_FILE)
    (root / "tests" / "helpers.py").write_text(TEST_FILE)
    (root / "pkg" / "broken.py").write_text("def f(:\n")
    return root


def test_pairs_from_a_python_codebase(codebase):
    records, summary = build_instructions(f"python:{codebase}", eval_fraction=0.0)
    by_instruction = {r["instruction"]: r for r in records}
    assert set(by_instruction) == {"Return the sum of a and b.", "Compute the area of a w by h box."}
    add = by_instruction["Return the sum of a and b."]
    assert add["input"] == "def add(a, b):"
    assert add["output"] == "    total = a + b\n    return total\n"
    area = by_instruction["Compute the area of a w by h box."]
    assert area["input"] == "def area(self, w: int, h: int) -> int:"
    assert area["output"].startswith("    if w < 0 or h < 0:\n        raise ValueError")
    assert '"""' not in area["output"]
    assert all("test" not in r["source"] and "conftest" not in r["source"] for r in records)
    assert summary["test_files_skipped"] == 4
    assert summary["duplicates"] == 2  # the copy's pairs
    assert {r["split"] for r in records} == {"train"}


def test_split_is_by_file(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for k in range(40):
        body = f'def f{k}(x):\n    """Return x plus {k}, exactly."""\n    return x + {k}\n'
        (root / f"m{k}.py").write_text(body)
    records, summary = build_instructions(f"python:{root}", eval_fraction=0.2)
    split_of = {}
    for r in records:
        split_of.setdefault(r["source"].split(":")[0], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert 0 < summary["eval"] < summary["pairs"]


def test_only_python_and_a_folder_with_pairs(tmp_path, codebase):
    with pytest.raises(ConfigError, match="python"):
        build_instructions(f"rust:{codebase}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("x = 1\n")
    with pytest.raises(CorpusError):
        build_instructions(f"python:{empty}")


def test_read_alpaca_and_chat_files(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Add.", "input": "def add(a, b):", "output": "return a + b"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}], "split": "eval"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = read_instructions(str(path))
    assert data.examples[0].messages == [{"role": "user", "content": "Add.\n\ndef add(a, b):"},
                                         {"role": "assistant", "content": "return a + b"}]
    assert data.examples[1].messages[0]["role"] == "system"
    for fraction in (0.0, 0.05, 0.99):
        train, held = data.split(fraction)
        assert [len(train), len(held)] == [1, 1] and held[0].split == "eval"


def test_split_respects_pins_and_a_zero_fraction():
    from codeprune.data.instructions import Example, InstructionSet

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pinned = InstructionSet("x", [Example(msgs, str(k), "train") for k in range(5)])
    assert [len(p) for p in pinned.split(0.5)] == [5, 0]  # pins never move
    free = InstructionSet("x", [Example(msgs, str(k)) for k in range(20)])
    assert [len(p) for p in free.split(0.0)] == [20, 0]
    train, held = free.split(0.01)
    assert len(held) >= 1 and len(train) + len(held) == 20
    train, held = free.split(0.999)
    assert len(train) >= 1


@pytest.mark.parametrize("content, message", [
    ("", "no example"),
    ("not json\n", "not JSON"),
    ('{"text": "plain"}\n', "expected instruction/output"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}\n', "no assistant"),
    ('{"instruction": "a", "output": "b", "split": "dev"}\n', "split"),
])
def test_bad_instruction_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        read_instructions(str(path))


def test_missing_file():
    with pytest.raises(CorpusError, match="not found"):
        read_instructions("/nonexistent/instr.jsonl")


def test_write_jsonl_refuses_an_existing_file(tmp_path):
    path = write_jsonl([{"a": 1}], tmp_path / "x.jsonl")
    with pytest.raises(OutputExistsError):
        write_jsonl([{"a": 2}], path)
    assert json.loads(path.read_text()) == {"a": 1}


def test_cli_instructions(codebase, tmp_path, capsys):
    out = tmp_path / "instr.jsonl"
    assert main(["instructions", "--from", f"python:{codebase}", "--out", str(out)]) == 0
    assert "2 pairs" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2
    assert main(["instructions", "--from", f"python:{codebase}", "--out", str(out)]) == 2
    assert main(["instructions", "--from", f"go:{codebase}", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "python" in capsys.readouterr().err


def test_hf_specs_fail_with_one_clear_error():
    with pytest.raises(ConfigError, match="hf:NAME"):
        read_instructions("hf:a:b:c:d")
    with pytest.raises((ConfigError, CorpusError)):  # no datasets package, or no hub here
        read_instructions("hf:sahil2801/CodeAlpaca-20k:train")


JAVA = """package demo;

/** A class comment, not a method's. */
public class Calc {
    /**
     * Return the sum of a and b.
     * @param a the first
     */
    @Deprecated
    public static int add(int a, int b) {
        int t = a + b;
        return t;
    }

    // Undocumented neighbours are skipped.

    public int bare(int x) { return x; }

    /** Build an empty calculator instance. */
    public Calc() {
        super();
    }
}
"""

JS = """/** Square a number exactly once. */
export function sq(x) {
  return x * x;
}

class Box {
  // Double the value given,
  // twice as large.
  dbl(x) {
    return 2 * x;
  }
}
"""

CPP = """#include <vector>

// Compute the larger of two values.
template <typename T>
T mx(T a, T b) {
    return a > b ? a : b;
}

/* Sum every element of the vector. */
int total(const std::vector<int>& v) {
    int s = 0;
    for (int x : v) s += x;
    return s;
}
"""


@pytest.mark.parametrize("lang, name, text, expected", [
    ("java", "Calc.java", JAVA, {
        "Return the sum of a and b.\n@param a the first": (
            "@Deprecated\npublic static int add(int a, int b)", "    int t = a + b;\n    return t;\n"),
        "Build an empty calculator instance.": ("public Calc()", "    super();\n")}),
    ("javascript", "sq.js", JS, {
        "Square a number exactly once.": ("export function sq(x)", "    return x * x;\n"),
        "Double the value given,\ntwice as large.": ("dbl(x)", "    return 2 * x;\n")}),
    ("cpp", "mx.cpp", CPP, {
        "Compute the larger of two values.": ("template <typename T>\nT mx(T a, T b)",
                                              "    return a > b ? a : b;\n"),
        "Sum every element of the vector.": (
            "int total(const std::vector<int>& v)",
            "    int s = 0;\n    for (int x : v) s += x;\n    return s;\n")}),
])
def test_pairs_from_brace_languages(tmp_path, lang, name, text, expected):
    pytest.importorskip("tree_sitter")
    root = tmp_path / lang
    root.mkdir()
    (root / name).write_text(text)
    test_name = {"java": "CalcTest.java", "javascript": "sq.test.js", "cpp": "mx_test.cpp"}[lang]
    (root / test_name).write_text(text)
    records, summary = build_instructions(f"{lang}:{root}", eval_fraction=0.0)
    got = {r["instruction"]: (r["input"], r["output"]) for r in records}
    assert got == expected
    assert summary["test_files_skipped"] == 1
