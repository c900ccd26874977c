"""The verified model cache: manifests, one builder per entry, crash detection, atomic rebuilds.

    entry = CacheEntry("smollm2-135m", cache_root() / "models" / "smollm2-135m", "smollm2-135m")
    folder = ensure(entry, built=lambda f: ..., fill=lambda tmp: ...)   # checked, or built once
    verify(entry)                                   # `codeprune models --verify`: None or what is wrong

A cache entry is a folder under the cache root (``models/<alias>`` for an offline
alias, ``gguf/<stem>-<key>`` for a .gguf file given by path: see offline.py). It is
built in an owner-tagged temporary folder beside it (``outputs.scratch_dir``), every
file fsynced, then ``codeprune-manifest.json`` is written last (each file's size and
sha256) and the folder moved into place in one step (renameat2: RENAME_NOREPLACE,
or RENAME_EXCHANGE for a rebuild, so the old entry stays whole until the new one is
complete). Temporary folders of dead processes are removed (``outputs.remove_stale``).

Checks: every load compares each file's size with the manifest (one stat per file);
the sha256 is checked by ``codeprune models --verify`` and by the first load of each
entry after a crash. A mismatch raises CorruptModelError naming the entry and
``codeprune models --rebuild NAME``.

Crash detection: each process that uses a cache root holds a marker file
``<root>/.active-<pid>_<start>-<random>`` (made with ``outputs.scratch_file``,
removed at normal exit, KeyboardInterrupt and Terminated included). A marker whose
owner is gone means a process died abruptly (SIGKILL, OOM, power loss) while it
used the cache: the next process removes the marker and lists every entry in
``<root>/verify-pending.json``; each listed entry is hashed on its next load (or by
``--verify``) and leaves the list once it checks out or is rebuilt.

An entry without a manifest (built by a codeprune before manifests) is adopted on
its first load: its config must parse and every safetensors file must open and hold
only finite numbers (0xFF bytes read as NaN), then its manifest is written from
the files as they are; one that fails is reported corrupt, with the rebuild command.

Concurrency: building, checking and rebuilding an entry hold an exclusive
``fcntl.flock`` on ``<root>/.lock-<kind>-<name>`` (lock files are never removed, so
two processes never lock different inodes). A second process building the same
entry waits, then finds it built.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codeprune.errors import CorruptModelError
from codeprune.outputs import install, remove_stale, scratch_dir, scratch_file

MANIFEST = "codeprune-manifest.json"
PENDING = "verify-pending.json"
_ACTIVE_PREFIX = ".active-"
_TMP = re.compile(r"\..+\.tmp-")  # .<entry>.tmp-<tag>-...: an entry being built
_ACTIVE: dict[Path, tuple[int, Path]] = {}  # cache roots this process uses -> (pid, its marker there)


@dataclass(frozen=True)
class CacheEntry:
    """A cache folder, the name users know it by, and what ``codeprune models --rebuild`` takes."""

    name: str
    folder: Path
    rebuild: str

    @property
    def root(self) -> Path:
        return self.folder.parent.parent

    @property
    def key(self) -> str:  # "models/smollm2-135m": its line in verify-pending.json
        return f"{self.folder.parent.name}/{self.folder.name}"

    def corrupt(self, detail: str) -> CorruptModelError:
        """The error of a corrupt entry; its ``status`` is the line ``--verify`` prints after the name."""
        status = f"corrupt ({detail}): run `codeprune models --rebuild {self.rebuild}`"
        err = CorruptModelError(f"cache of '{self.name}' is {status}")
        err.status = status
        return err


# --- locks, crash markers, the pending list -------------------------------------------------

@contextlib.contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def entry_lock(entry: CacheEntry):
    """Exclusive lock of one entry (waits for another process building or checking it)."""
    return _flock(entry.root / f".lock-{entry.folder.parent.name}-{entry.folder.name}")


def note_crashes(root: Path) -> None:
    """Hold this process's marker in ``root``; a dead process's marker puts every entry on the
    pending list (hashed on next load)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, f".{PENDING}.tmp-")
    if remove_stale(root, _ACTIVE_PREFIX):
        _mark_pending(root, [f"{k}/{p.name}" for k in ("models", "gguf") for p in _entries(root / k)])
    if _ACTIVE.get(root, (None,))[0] != os.getpid():  # a forked child makes its own
        fd, marker = scratch_file(_ACTIVE_PREFIX, root)
        os.close(fd)
        if not _ACTIVE:
            atexit.register(_drop_markers)
        _ACTIVE[root] = (os.getpid(), marker)


def _drop_markers() -> None:
    for pid, marker in _ACTIVE.values():
        if pid == os.getpid():  # never a parent's marker, from a forked child that exits normally
            marker.unlink(missing_ok=True)
    _ACTIVE.clear()


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def _pending(root: Path) -> set[str]:
    try:
        return set(json.loads((root / PENDING).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _mark_pending(root: Path, keys: list[str], *, add: bool = True) -> None:
    with _flock(root / ".lock-pending"):
        now = _pending(root)
        new = now | set(keys) if add else now - set(keys)
        if new == now:
            return
        if not new:
            (root / PENDING).unlink(missing_ok=True)
            return
        fd, tmp = scratch_file(f".{PENDING}.tmp-", root)
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(new), f)
        os.replace(tmp, root / PENDING)


# --- manifests ------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256 in ``folder/MANIFEST``, each file fsynced first."""
    files = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(entry: CacheEntry) -> dict:
    try:
        files = json.loads((entry.folder / MANIFEST).read_text())["files"]
        return {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise entry.corrupt(f"{MANIFEST} is unreadable") from None


def check(entry: CacheEntry, *, hashes: bool) -> None:
    """Raise CorruptModelError when a file differs from the manifest (sizes; sha256 if ``hashes``)."""
    manifest = _read_manifest(entry)
    for rel, (size, _) in manifest.items():
        try:
            actual = (entry.folder / rel).stat().st_size
        except FileNotFoundError:
            raise entry.corrupt(f"{rel} is missing") from None
        if actual != size:
            raise entry.corrupt(f"{rel}: size {actual} != {size}")
    for rel, (_, digest) in manifest.items() if hashes else ():
        if _sha256(entry.folder / rel) != digest:
            raise entry.corrupt(f"{rel}: sha256 differs from the manifest")


def _adopt(entry: CacheEntry) -> None:
    """Check an entry built before manifests as well as its files allow, then write its manifest."""
    from safetensors import safe_open

    try:
        json.loads((entry.folder / "config.json").read_text())
    except (OSError, ValueError):
        raise entry.corrupt("config.json is missing or unreadable") from None
    for path in sorted(entry.folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                bad = next((k for k in f.keys() if not _finite(f.get_tensor(k))), None)
        except Exception as e:  # safetensors raises its own error types for a truncated file
            raise entry.corrupt(f"{path.name}: {str(e).strip()[:120]}") from None
        if bad is not None:
            raise entry.corrupt(f"{path.name}: tensor {bad} holds nan/inf")
    write_manifest(entry.folder)


def _finite(t) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


# --- ensure, verify, build ------------------------------------------------------------------

def ensure(entry: CacheEntry, *, built: Callable[[Path], bool], fill: Callable[[Path], None],
           rebuild: bool = False) -> Path:
    """``entry.folder``, checked; built (or with ``rebuild`` rebuilt) by ``fill(tmp_folder)`` when
    ``built(folder)`` says it is absent or out of date."""
    note_crashes(entry.root)
    with entry_lock(entry):
        if not rebuild and entry.folder.is_dir() and built(entry.folder):
            _check_on_load(entry)
            return entry.folder
        _build(entry, fill)
    return entry.folder


def _check_on_load(entry: CacheEntry) -> None:
    pending = entry.key in _pending(entry.root)
    if not (entry.folder / MANIFEST).is_file():
        _adopt(entry)
    else:
        check(entry, hashes=pending)
    if pending:
        _mark_pending(entry.root, [entry.key], add=False)


def verify(entry: CacheEntry) -> str | None:
    """None when ``entry`` matches its manifest (hashes included), else "corrupt (what is wrong):
    run ..."; an entry without a manifest is adopted (see the module docstring)."""
    note_crashes(entry.root)
    with entry_lock(entry):
        try:
            if (entry.folder / MANIFEST).is_file():
                check(entry, hashes=True)
            else:
                _adopt(entry)
        except CorruptModelError as e:
            return getattr(e, "status", str(e))
        _mark_pending(entry.root, [entry.key], add=False)
    return None


def _build(entry: CacheEntry, fill: Callable[[Path], None]) -> None:
    """Fill a tagged temporary folder, write its manifest, move it into place (caller holds the lock)."""
    parent = entry.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, _TMP)
    tmp = scratch_dir(f".{entry.folder.name}.tmp-", parent)
    try:
        fill(tmp)
        write_manifest(tmp)
        tmp.chmod(0o755)
        install(tmp, entry.folder, entry.folder.exists())  # an old entry ends up in tmp
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _mark_pending(entry.root, [entry.key], add=False)
