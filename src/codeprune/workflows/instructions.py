"""``codeprune instructions``: instruction pairs (docstring / comment -> body) from a codebase.

    codeprune instructions --from python:src/ --out data/instr.jsonl
    codeprune instructions --from python:src/ --style completion --with-tests --out data/instr.jsonl

With ``with_tests`` every pair's doctest runs in the sandbox twice before it is
kept: with the reference function it must pass, with a stub (a function of the
same name that raises) it must fail. A test that fails for the reference (module
state, output that changes from run to run, a helper the sandbox cannot import)
or passes without the function (examples that never reach it) could not judge an
answer, so its pair is dropped; the summary counts both.
"""

from __future__ import annotations

from pathlib import Path

from codeprune.data.instructions import (
    EVAL_FRACTION,
    build_instructions,
    program_with_tests,
    reference_answer,
    write_jsonl,
)
from codeprune.errors import CorpusError
from codeprune.evaluation.sandbox import SandboxLimits, check_sandbox, run_programs
from codeprune.workflows.common import check_out, releasing_outputs


def _stub(row: dict) -> str:
    """A wrong answer on purpose: a test that still passes with it never reaches the function."""
    return f"def {row['function']}(*args, **kwargs):\n    raise NotImplementedError\n"


def check_tests(records: list[dict], limits: SandboxLimits | None = None,
                workers: int | None = None) -> tuple[list[dict], dict]:
    """(the records whose test passes with the reference and fails with a stub, counts)."""
    from tqdm.auto import tqdm

    programs = [program_with_tests(r, reference_answer(r)) for r in records] + \
               [program_with_tests(r, _stub(r)) for r in records]
    with tqdm(total=len(programs), desc="doctests in the sandbox", unit="program") as bar:
        results = run_programs(programs, limits=limits, workers=workers, progress=bar)
    ref, stub = results[:len(records)], results[len(records):]
    kept = [r for r, a, b in zip(records, ref, stub, strict=True) if a.passed and not b.passed]
    counts = {"tests_found": len(records), "tests_kept": len(kept),
              "tests_fail_with_reference": sum(not a.passed for a in ref),
              "tests_pass_without_function": sum(a.passed and b.passed
                                                 for a, b in zip(ref, stub, strict=True))}
    return kept, counts


@releasing_outputs
def instructions(source: str, *, out: str | Path | None = None, eval_fraction: float = EVAL_FRACTION,
                 overwrite: bool = False, style: str = "alpaca", with_tests: bool = False,
                 timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None) -> tuple[list[dict], dict]:
    """Instruction pairs from a codebase ``python:DIR`` (or java/javascript/cpp:DIR,
    python-stdlib); written to ``out`` (.jsonl) when given. ``style``: "alpaca"
    (docstring -> body) or "completion" (HumanEval-shaped chat pairs); ``with_tests``:
    only functions with doctests, each test checked in the sandbox (``timeout`` seconds,
    ``memory_mb`` per program). Returns (records, summary). See codeprune/data/instructions.py."""
    check_out(out, overwrite, source, kind="file")  # before reading the codebase
    limits = SandboxLimits(timeout=timeout, memory_mb=memory_mb)
    if with_tests:
        check_sandbox(limits)
    records, summary = build_instructions(source, eval_fraction=eval_fraction, style=style,
                                          with_tests=with_tests)
    summary["style"] = style
    if with_tests:
        records, counts = check_tests(records, limits, workers)
        summary |= counts
        if not records:
            raise CorpusError(f"{source}: none of the {counts['tests_found']} doctests passes with its own "
                              "function and fails without it in the sandbox")
        summary["pairs"] = len(records)
        summary["train"] = sum(r["split"] == "train" for r in records)
        summary["eval"] = summary["pairs"] - summary["train"]
    if out is not None:
        summary["out"] = str(write_jsonl(records, out, overwrite=overwrite))
    return records, summary
