"""Output folders: refuse an existing one unless told, and write new ones atomically.

    out = check_output("runs/wanda50", overwrite=False)      # before any work is done
    write_atomically("runs/wanda50", False, lambda tmp: (tmp / "a.json").write_text("{}"))

``fill`` writes into a hidden temporary folder beside the target, which is renamed
into place at the end: an interrupted run leaves nothing half-written. Before the
rename every folder inside becomes mode 0755 and every file 0644 (mkdtemp makes
0700 and transformers writes safetensors 0600), so other users of a shared
machine can read a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from codeprune.errors import OutputExistsError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output (before any work is done) unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a folder")
        if not overwrite:
            raise OutputExistsError(f"output folder {out} exists: pass --overwrite to replace it")
    return out


def write_atomically(out: str | Path, overwrite: bool, fill) -> Path:
    """Call ``fill(tmp_folder)`` then move the folder to ``out`` (replacing it if allowed)."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        _make_readable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 under ``folder`` (itself included); links are left alone."""
    folder.chmod(0o755)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o644)
