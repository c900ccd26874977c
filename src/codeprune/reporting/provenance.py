"""Where a report came from: versions, the command line, the model's source without local paths.

    from codeprune.reporting.provenance import provenance, sanitise_source, set_command
    set_command(["prune", "--model", "smollm2-135m"])   # the CLI does this once per run
    provenance()   # {"codeprune": "0.x", "torch": "2.x", "transformers": "5.x", "python": "3.11.7",
                   #  "command": "codeprune prune --model smollm2-135m", "created": "2025-...+00:00"}

Versions come from ``importlib.metadata``: neither torch nor transformers is imported
here. ``sanitise_source`` turns ``LoadedModel.origin`` (which holds cache paths and
absolute file names) into what report.json may carry: the alias, the hub id, a path
relative to the working folder when the model is inside it, else the folder's name.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path

from codeprune.version import __version__

# the fields of schema.Source (tests/reporting/test_reporting.py checks they agree)
SOURCE_FIELDS = frozenset({"kind", "name", "base_model", "license", "model_type", "dtype", "upstream",
                           "quantization", "sha256", "note"})

_command: str | None = None


def set_command(argv: list[str]) -> None:
    """Remember the command line of this run (``argv`` without the program name), with local
    absolute paths shown as ``display_name`` shows them (reports hold no local paths)."""
    global _command
    _command = shlex.join(["codeprune", *(display_name(a) for a in argv)])


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def provenance() -> dict:
    """{"codeprune", "torch", "transformers", "python", "command", "created"} of this process now."""
    return {"codeprune": __version__, "torch": _version("torch"), "transformers": _version("transformers"),
            "python": platform.python_version(), "command": _command,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def display_path(path: str | Path) -> str:
    """A local path as a report shows it: relative to the working folder when inside it, else
    its last component (a relative path stays as given)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name or str(path)


def display_name(text: str | None) -> str | None:
    """A model name or data spec as a report shows it: an absolute path (also after a
    ``LANG:`` prefix) goes through ``display_path``; aliases, hub ids and relative paths stay."""
    if text is None:
        return None
    text = str(text)
    if text.startswith(("/", "~")):
        return display_path(text)
    head, sep, rest = text.partition(":")
    if sep and head.isidentifier() and rest.startswith(("/", "~")):
        return f"{head}:{display_path(rest)}"
    return text


def _cached_info(folder: Path) -> dict | None:
    """The codeprune-source.json of an alias / GGUF cache folder, if ``folder`` is one."""
    from codeprune.models.offline import SOURCE_FILE

    f = folder / SOURCE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


def sanitise_source(origin: dict | None, name: str) -> dict:
    """``LoadedModel.origin`` without local paths: {"kind", "name", and the cache's upstream,
    quantization, sha256, note where known}. ``name`` is what the user asked for."""
    origin = dict(origin or {})
    kind = origin.pop("kind", None) or "memory"
    path, gguf = origin.pop("path", None), origin.pop("gguf", None)
    if kind == "folder" and path:
        cached = _cached_info(Path(path))  # a cache folder given by its path
        if cached:
            origin = {**cached, **origin}
            gguf = cached.get("gguf")
            kind = "alias" if cached.get("alias") else "gguf"
    origin.pop("gguf", None)
    if kind == "alias":
        shown = origin.pop("alias", None) or name
    elif kind == "gguf":
        shown = display_path(gguf) if gguf else display_name(name)
    elif kind == "hub":
        shown = name
    else:  # a folder: the name as given, unless it is an absolute path
        shown = display_name(name)
    known = SOURCE_FIELDS - {"kind", "name"}  # what else an origin holds is not reported
    extra = {k: display_name(v) if isinstance(v, str) else v for k, v in origin.items() if k in known}
    return {"kind": kind, "name": shown, **extra}
