"""Completion-style pairs (rendered like ``eval --humaneval`` prompts) and doctests as tests."""

import json

import pytest

import codeprune.workflows.distill as distill_mod
from codeprune.cli import main
from codeprune.data.instructions import (
    doctest_examples,
    doctest_program,
    module_name,
    program_with_tests,
    python_pairs,
    reference_answer,
)
from codeprune.data.prompts import RESPONSE_PREFIX, encode, prompt_segments
from codeprune.errors import ConfigError, CorpusError
from codeprune.evaluation.humaneval import build_prompt, extract_completion
from codeprune.evaluation.sandbox import run_programs
from codeprune.workflows.distill import DistillConfig, DistillRow, answer_all
from codeprune.workflows.instructions import check_tests

from ..conftest import _tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LIB = '''"""Helpers."""
import re

_WORD = re.compile(r"[a-z]+")


def words(text):
    """The lower-case words of ``text``.

    >>> words("Hello, big World")
    ['hello', 'big', 'world']
    """
    return _WORD.findall(text.lower())


def shout(text):
    """Upper-case ``text`` with a bang.

    >>> print("unrelated")
    unrelated
    """
    return text.upper() + "!"


def flaky(n):
    """A doctest that fails even for its own body.

    >>> flaky(2)
    5
    """
    return n + 1


def plain(x):
    """Double x, no examples here."""
    return 2 * x


class Stack:
    def push(self, x):
        """Push x.

        >>> s = Stack(); s.push(1)
        [1]
        """
        self.items = getattr(self, "items", []) + [x]
        return self.items
'''


def chat_tokenizer():
    tok = _tokenizer()
    tok.chat_template = CHATML
    return tok


def test_completion_pairs_render_exactly_like_humaneval_instruct_prompts():
    tok = chat_tokenizer()
    records = python_pairs(LIB, "lib.py", style="completion")
    assert len(records) == 5  # every documented function and method
    for rec in records:
        user, answer = rec["messages"]
        problem = user["content"].split("```python\n", 1)[1].rsplit("```", 1)[0]
        assert problem.startswith("def ") and '"""' in problem and "return" not in problem
        prompt, trained = prompt_segments(tok, rec["messages"])[:2]
        assert not prompt[1] and trained[1]
        # the prompt recovery trains after, plus the answer's opening fence, is the evaluation prompt
        assert prompt[0] + RESPONSE_PREFIX == build_prompt({"prompt": problem}, "instruct", tok)
        assert answer["content"].startswith(RESPONSE_PREFIX) and answer["content"].endswith("```")
        # the model's answer, read as eval reads it, is the whole function that replaces the stub
        entry = problem.split("(")[0].removeprefix("def ")
        code = extract_completion({"entry_point": entry}, answer["content"][len(RESPONSE_PREFIX):],
                                  "instruct")
        assert code.lstrip("\n").startswith(problem.rstrip("\n").split("\n")[0])
    enc = encode(tok, records[0]["messages"], 2048)
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != -100)
    assert tok.decode(enc["input_ids"][:first]) + RESPONSE_PREFIX == build_prompt(
        {"prompt": records[0]["messages"][0]["content"].split("```python\n", 1)[1].rsplit("```", 1)[0]},
        "instruct", tok)


def test_doctest_extraction():
    assert doctest_examples('Sum.\n\n>>> add(1, 2)\n3\n>>> add(\n...     1, 1)\n2\n', "add") == \
        ">>> add(1, 2)\n3\n>>> add(\n...     1, 1)\n2\n"
    assert doctest_examples("No examples.", "add") is None
    assert doctest_examples(">>> print(1)\n1\n", "add") is None  # never calls the function
    assert doctest_examples(">>> x.add(1)\n1\n", "add") is None  # a method of something else
    records = python_pairs(LIB, "lib.py", with_tests=True, module="lib")
    by_name = {r["function"]: r for r in records}
    assert set(by_name) == {"words", "flaky"}  # module level, examples that call the function
    w = by_name["words"]
    assert w["problem"].startswith("def words(text):") and w["problem"].rstrip().endswith('"""')
    assert "import re" in w["prompt_code"] and "import_module('lib')" in w["prompt_code"]
    assert module_name("json/decoder.py") == "json.decoder" and module_name("pkg/__init__.py") == "pkg"
    assert module_name("my-tool/x.py") is None


def test_a_pairs_doctest_passes_for_the_reference_and_fails_for_a_wrong_body():
    records = python_pairs(LIB, "lib.py", style="completion", with_tests=True)
    w = next(r for r in records if r["function"] == "words")
    w["prompt_code"] += "import re\n_WORD = re.compile(r'[a-z]+')\n"  # the module is not importable here
    wrong_function = "```python\ndef words(text):\n    return text.split()\n```"
    wrong_body = "    return text.lower().split()\n"  # continues the problem, as eval continues a prompt
    right_body = "    return _WORD.findall(text.lower())\n"
    programs = [program_with_tests(w, reference_answer(w)), program_with_tests(w, wrong_function),
                program_with_tests(w, wrong_body), program_with_tests(w, right_body)]
    assert [r.passed for r in run_programs(programs, workers=2)] == [True, False, False, True]


def test_check_tests_keeps_only_tests_that_can_judge(tmp_path):
    records = python_pairs(LIB, "lib.py", with_tests=True, module="lib")
    shout = dict(records[0], function="shout", output="    return text.upper() + '!'\n",
                 test=doctest_program(">>> shout('Hello, big World')\n'HELLO, BIG WORLD!'\n", "shout"),
                 problem="def shout(text):\n")
    records[0]["prompt_code"] += "import re\n_WORD = re.compile(r'[a-z]+')\n"
    kept, counts = check_tests(records + [shout], workers=2)
    assert [r["function"] for r in kept] == ["words", "shout"]
    assert counts == {"tests_found": 3, "tests_kept": 2, "tests_fail_with_reference": 1,
                      "tests_pass_without_function": 0}


SELF_CONTAINED = '''
def clamp(x, lo, hi):
    """Clamp x to [lo, hi].

    >>> clamp(5, 0, 3)
    3
    >>> clamp(-1, 0, 3)
    0
    """
    return max(lo, min(x, hi))
'''


def test_cli_instructions_completion_with_tests(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "textutil.py").write_text(LIB)  # not importable in the sandbox: words loses _WORD
    (src / "mathutil.py").write_text(SELF_CONTAINED)
    out = tmp_path / "d.jsonl"
    code = main(["instructions", "--from", f"python:{src}", "--style", "completion", "--with-tests",
                 "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["function"] for r in rows] == ["clamp"]
    assert summary["tests_found"] == 3 and summary["tests_kept"] == summary["pairs"] == 1
    assert summary["tests_fail_with_reference"] == 2 and summary["style"] == "completion"
    assert rows[0]["messages"][1]["content"].startswith(RESPONSE_PREFIX)
    assert "clamp(5, 0, 3)" in rows[0]["test"]
    bad = main(["instructions", "--from", "java:" + str(src), "--style", "completion", "--out",
                str(tmp_path / "j.jsonl")])
    assert bad == 2 and "for Python" in capsys.readouterr().err


def test_with_tests_refuses_a_codebase_without_doctests(tmp_path):
    from codeprune.data.instructions import build_instructions

    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text('def f(x):\n    """Double x, no examples."""\n    return 2 * x\n')
    with pytest.raises(CorpusError, match="doctest"):
        build_instructions(f"python:{src}", with_tests=True)
    with pytest.raises(ConfigError, match="style"):
        build_instructions(f"python:{src}", style="chat")


def test_distill_answers_completion_rows_as_eval_does(monkeypatch):
    """Completion rows are prompted with the opening fence and stopped at the closing one."""
    seen = {}

    def fake_generate(lm, prompts, **kw):
        seen["prompts"], seen["stops"] = prompts, kw["stops"]
        return [["    return 1\n```\nextra"] for _ in prompts]

    monkeypatch.setattr(distill_mod, "generate_texts", fake_generate)
    tok = chat_tokenizer()
    rec = python_pairs(LIB, "lib.py", style="completion")[0]
    row = DistillRow(rec, rec["messages"], "x")

    class LM:
        tokenizer = tok

    answers = answer_all(LM(), [row], DistillConfig(), "test")
    problem = rec["messages"][0]["content"].split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert seen["prompts"] == [build_prompt({"prompt": problem}, "instruct", tok)]
    assert seen["stops"] == ("\n```",)
    assert answers == [RESPONSE_PREFIX + "    return 1\n```"]
