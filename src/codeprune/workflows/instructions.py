"""``codeprune instructions``: instruction pairs (docstring / comment -> body) from a codebase.

    codeprune instructions --from python:src/ --out data/instr.jsonl
"""

from __future__ import annotations

from pathlib import Path

from codeprune.data.instructions import build_instructions, write_jsonl
from codeprune.workflows.common import check_out, releasing_outputs


@releasing_outputs
def instructions(source: str, *, out: str | Path | None = None, eval_fraction: float = 0.05,
                 overwrite: bool = False) -> tuple[list[dict], dict]:
    """Instruction pairs (docstring -> body) from a codebase ``python:DIR``; written to ``out``
    (.jsonl) when given. Returns (records, summary). See codeprune/data/instructions.py."""
    check_out(out, overwrite, source, kind="file")  # before reading the codebase
    records, summary = build_instructions(source, eval_fraction=eval_fraction)
    if out is not None:
        summary["out"] = str(write_jsonl(records, out, overwrite=overwrite))
    return records, summary
