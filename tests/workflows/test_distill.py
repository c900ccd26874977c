"""``distill-data`` (distill.py): Flab-Pruner's code instruction data strategy."""

from __future__ import annotations

import json

import pytest

import codeprune
import codeprune.workflows.distill as distill_mod
from codeprune.cli import main
from codeprune.data.instructions import read_instructions
from codeprune.errors import ConfigError, CorpusError
from codeprune.workflows.distill import DistillConfig, answer_code, prompt_of, similarity

from ..conftest import make_tiny

ROWS = [
    {"id": "a", "instruction": "Add two numbers.", "output": "def add(a, b):\n    return a + b\n",
     "test": "assert add(1, 2) == 3\n"},
    {"id": "b", "instruction": "Subtract.", "output": "def sub(a, b):\n    return a - b\n",
     "test": "assert sub(3, 1) == 2\n"},
    {"id": "c", "instruction": "Multiply.", "output": "def mul(a, b):\n    return a * b\n",
     "test": "def check(f):\n    assert f(2, 3) == 6\n", "entry_point": "mul"},
    {"instruction": "Say hello.", "output": "print('hello world')", "split": "eval"},
]
PRUNED = {"Add": "```python\ndef add(a, b):\n    return a - b\n```",
          "Subtract": "def sub(a, b):\n    return a - b\n",
          "Multiply": "def mul(a, b):\n    return a + b\n", "Say": "import os"}
ORIGINAL = {"Add": "Here:\n```python\ndef add(a, b):\n    return b + a\n```\n",
            "Multiply": "def mul(a, b): pass",
            "Say": "print('hello world')"}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scripted(monkeypatch):
    """Answers by model name instead of generation, so that correctness is known."""
    def fake(lm, rows, cfg, desc):
        table = PRUNED if lm.name == "pruned" else ORIGINAL
        return [table[r.messages[0]["content"].split()[0].rstrip(".")] for r in rows]

    monkeypatch.setattr(distill_mod, "answer_all", fake)
    orig, pruned = make_tiny("llama"), make_tiny("llama", seed=1)
    orig.name, pruned.name = "original", "pruned"
    return orig, pruned


def test_keeps_what_the_pruned_model_gets_wrong(scripted, tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "o.jsonl"
    records, summary = codeprune.distill_data(*scripted, str(data), out=out, workers=2)
    by_id = {r["id"]: r for r in records}
    # b: the pruned model passes its test -> dropped
    assert set(by_id) == {"a", "c", next(k for k in by_id if k not in "ac")}
    a = by_id["a"]  # original answer passes -> it becomes the target
    assert a["distill"] == {"criterion": "tests", "pruned_score": 0.0, "original_score": 1.0,
                                 "original_correct": True, "target": "original"}
    assert a["output"] == ORIGINAL["Add"] and a["test"] == ROWS[0]["test"]
    c = by_id["c"]  # check(entry_point) fails for both -> the reference stays
    assert c["distill"]["target"] == "reference" and c["output"] == ROWS[2]["output"]
    hello = [r for r in records if r["instruction"] == "Say hello."][0]
    assert hello["distill"]["criterion"] == "match" and hello["distill"]["target"] == "original"
    assert hello["split"] == "eval" and len(hello["id"]) == 40
    expected = {"examples": 4, "pruned_correct": 1, "kept": 3, "target_original": 2, "target_reference": 1,
                "with_tests": 3}
    assert {k: summary[k] for k in expected} == expected
    # recover reads it, and the untouched example keeps the id (hence split) it had
    ids = {e.id for e in read_instructions(str(out)).examples}
    assert ids == set(by_id)


def test_criterion_match_ignores_tests_and_tests_needs_them(scripted, tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    records, summary = codeprune.distill_data(*scripted, str(data), criterion="match")
    assert all(r["distill"]["criterion"] == "match" for r in records)
    with pytest.raises(CorpusError, match="'test' field"):
        codeprune.distill_data(*scripted, str(data), criterion="tests")


def test_nothing_to_distill_and_bad_options(scripted, tmp_path):
    data = write(tmp_path / "d.jsonl", [ROWS[1]])
    with pytest.raises(CorpusError, match="nothing to distill"):
        codeprune.distill_data(*scripted, str(data), out=tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ConfigError):
        DistillConfig(match_threshold=0)
    with pytest.raises(ConfigError):
        DistillConfig(criterion="vibes")
    with pytest.raises(CorpusError, match="not found"):
        codeprune.distill_data(*scripted, str(tmp_path / "missing.jsonl"))


def test_helpers():
    assert answer_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"
    assert answer_code("x = 1") == "x = 1"
    assert similarity("a  b\n c", "a b c") == 1.0
    assert similarity("abc", "xyz") == 0.0
    tok = make_tiny("llama").tokenizer
    prompt, templated = prompt_of(tok, [{"role": "user", "content": "Do it."},
                                        {"role": "assistant", "content": "ok"}])
    assert prompt == "### Instruction:\nDo it.\n\n### Response:\n" and not templated


def test_cli_end_to_end_with_generation(tmp_path, monkeypatch, capsys):
    models = {"orig": make_tiny("llama"), "pruned": make_tiny("llama", seed=1)}
    monkeypatch.setattr("codeprune.workflows.common.load_model", lambda name, dtype="float32": models[name])
    data = write(tmp_path / "d.jsonl", [ROWS[3], {"instruction": "Return one.", "output": "return 1"}])
    out = tmp_path / "o.jsonl"
    args = ["distill-data", "--original", "orig", "--pruned", "pruned", "--data", str(data),
            "--out", str(out), "--max-new-tokens", "4", "--match-threshold", "1.0", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples"] == 2 and summary["kept"] == 2  # random models match nothing
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] for r in rows] == ["print('hello world')", "return 1"]  # reference targets
    assert main(args) == 2  # the output exists
    assert "exists" in capsys.readouterr().err
