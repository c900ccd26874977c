"""The one place report files are written and read: report.json + report.md (sweep.json + sweep.md).

    from codeprune.reporting.writer import read_report, write_report, writes_report
    write_report(tmp_folder, report)          # inside write_atomically's fill
    save_checkpoint(lm, out, overwrite=overwrite, extra=writes_report(report))   # beside a checkpoint
    report = read_report("runs/wanda50")      # a typed record (reporting/schema.py)

``write_report`` writes into an existing folder: the caller's atomic write
(outputs.write_atomically, models.checkpoint.save_checkpoint) makes the folder
appear whole or not at all. The Markdown comes from reporting/markdown.py's
``render``, chosen by the report's kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from codeprune.errors import CorruptModelError
from codeprune.models.checkpoint import disk_bytes
from codeprune.reporting.markdown import render
from codeprune.reporting.schema import Report, report_from_dict


def report_stem(kind: str) -> str:
    """The file name (without .json / .md) of a report of ``kind``."""
    return "sweep" if kind == "sweep" else "report"


def write_report(folder: str | Path, report: Report, *, measure_disk: bool = False) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` of ``report`` into ``folder``; returns the JSON path.

    ``measure_disk``: ``folder`` holds the saved checkpoint, so the efficiency section's
    ``disk_bytes`` is its size (weights, config, tokenizer; measured before the reports land)."""
    folder = Path(folder)
    efficiency = getattr(report, "efficiency", None)
    if measure_disk and efficiency is not None:
        efficiency.disk_bytes = disk_bytes(folder)
    stem = report_stem(report.kind)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (folder / f"{stem}.md").write_text(render(report))
    return path


def writes_report(report: Report) -> Callable[[Path], None]:
    """The ``extra`` hook of ``save_checkpoint`` that writes ``report`` beside the checkpoint
    (``disk_bytes`` measured on the checkpoint's files)."""

    def hook(folder: Path) -> None:
        write_report(folder, report, measure_disk=True)

    return hook


def read_report(path: str | Path) -> Report:
    """The report in ``path`` (a run folder, or a report.json / sweep.json file), validated."""
    path = Path(path).expanduser()
    if path.is_dir():
        summary = not (path / "report.json").is_file() and (path / "sweep.json").is_file()
        path = path / ("sweep.json" if summary else "report.json")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CorruptModelError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise CorruptModelError(f"{path} is not valid JSON: {e}") from e
    return report_from_dict(data, str(path))
