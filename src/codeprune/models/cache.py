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
two processes never lock different inodes; an existing one is opened read-only, as
flock needs no write access). A second process building the same entry waits, then
finds it built.

A cache this process cannot write (another user's, a read-only mount) still loads:
where the marker cannot be made, sizes (and the hashes of pending entries) are
checked, crash detection is off (one warning on stderr), and building an entry there
fails with one OutputWriteError naming the folder. A write fault while building (no
space, quota, permission; safetensors reports a full disk as SafetensorError) is
one OutputWriteError too, and the free space is checked before a build starts.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codeprune.errors import CorruptModelError, OutputExistsError, OutputWriteError
from codeprune.outputs import install, is_io_error, remove_stale, scratch_dir, scratch_file

MANIFEST = "codeprune-manifest.json"
PENDING = "verify-pending.json"
_ACTIVE_PREFIX = ".active-"
_TMP = re.compile(r"\..+\.tmp-")  # .<entry>.tmp-<tag>-...: an entry being built
_ACTIVE: dict[Path, tuple[int, Path]] = {}  # cache roots this process uses -> (pid, its marker there)
_READ_ONLY: dict[Path, str] = {}  # cache roots this process cannot write -> why
_WARNED: set[Path] = set()
_DENIED = (errno.EACCES, errno.EROFS, errno.EPERM)


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

def _denied(e: OSError) -> bool:
    return e.errno in _DENIED


@contextlib.contextmanager
def _flock(path: Path):
    """Hold an exclusive flock on ``path``; no lock where it can neither be opened nor made (a cache
    this process cannot write: it builds nothing there)."""
    fd = _open_lock(path)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # NFS emulates flock with POSIX locks: LOCK_EX needs a writable fd
                if e.errno != errno.EBADF:
                    raise
                os.close(fd)
                fd = _open(path, os.O_RDWR)
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _open(path: Path, flags: int) -> int | None:
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            return None
        raise
    except OSError:  # another user's, a read-only cache, a root that is not a folder: no lock
        return None


def _open_lock(path: Path) -> int | None:
    try:
        return _open(path, os.O_RDONLY)  # flock needs no write access: another user's lock file works
    except FileNotFoundError:
        pass
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    return _open(path, os.O_RDWR | os.O_CREAT)


def entry_lock(entry: CacheEntry):
    """Exclusive lock of one entry (waits for another process building or checking it)."""
    return _flock(entry.root / f".lock-{entry.folder.parent.name}-{entry.folder.name}")


def note_crashes(root: Path) -> bool:
    """Hold this process's marker in ``root``; a dead process's marker puts every entry on the
    pending list (hashed on next load). False where ``root`` cannot be written (crash detection off)."""
    if _ACTIVE.get(root, (None,))[0] != os.getpid():  # a forked child makes its own
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, marker = scratch_file(_ACTIVE_PREFIX, root)
        except OSError as e:  # another user's, read-only, full, not a folder: used as it is
            _READ_ONLY[root] = e.strerror or str(e)
            return False
        os.close(fd)
        _READ_ONLY.pop(root, None)
        _WARNED.discard(root)
        if not _ACTIVE:
            atexit.register(_drop_markers)
        _ACTIVE[root] = (os.getpid(), marker)
    try:  # markers are judged by outputs.owner_alive: another host's (a shared cache) count as alive
        remove_stale(root, f".{PENDING}.tmp-")
        dead = remove_stale(root, _ACTIVE_PREFIX)
    except OSError as e:  # another user's dead marker in a shared (sticky) folder: not ours to judge
        if not _denied(e):
            raise
        dead = []
    if dead:
        _mark_pending(root, [f"{k}/{p.name}" for k in ("models", "gguf") for p in _entries(root / k)])
    return True


def _warn_read_only(root: Path) -> None:
    if root not in _WARNED:
        print(f"codeprune: warning: the model cache {root} is read-only: crash detection off",
              file=sys.stderr)
        _WARNED.add(root)


def _refuse_build(entry: CacheEntry) -> OutputWriteError:
    return OutputWriteError(f"cannot build the cache of '{entry.name}': the model cache {entry.root} "
                            f"cannot be written ({_READ_ONLY.get(entry.root, 'read-only')}); set "
                            "CODEPRUNE_CACHE to a folder you can write")


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
    try:
        _update_pending(root, keys, add)
    except OSError as e:  # another user's pending list: it stays as it is
        if not _denied(e):
            raise


def _update_pending(root: Path, keys: list[str], add: bool) -> None:
    with _flock(root / ".lock-pending"):
        now = _pending(root)
        new = now | set(keys) if add else now - set(keys)
        if new == now:
            return
        if not new:
            (root / PENDING).unlink(missing_ok=True)
            return
        fd, tmp = scratch_file(f".{PENDING}.tmp-", root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(sorted(new), f)
            os.replace(tmp, root / PENDING)
        finally:
            tmp.unlink(missing_ok=True)


# --- manifests ------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(_MANIFEST_TMP))


_MANIFEST_TMP = f".{MANIFEST}.tmp-"


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256 in ``folder/MANIFEST`` (each file fsynced first), written
    to an owner-tagged temporary file and moved into place in one step."""
    remove_stale(folder, _MANIFEST_TMP)
    files = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    fd, tmp = scratch_file(_MANIFEST_TMP, folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, folder / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


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
    try:
        write_manifest(entry.folder)
    except OSError:  # another user's entry, a full disk: it checked out; adopted again next time
        pass


def _finite(t) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


# --- ensure, verify, build ------------------------------------------------------------------

def ensure(entry: CacheEntry, *, built: Callable[[Path], bool], fill: Callable[[Path], None],
           rebuild: bool = False, need: Callable[[], float | None] | None = None) -> Path:
    """``entry.folder``, checked; built (or with ``rebuild`` rebuilt) by ``fill(tmp_folder)`` when
    ``built(folder)`` says it is absent or out of date. ``need()``: about the bytes ``fill`` writes
    (None: unknown), checked against the free space before it starts."""
    writable = note_crashes(entry.root)
    with entry_lock(entry):
        if not rebuild and entry.folder.is_dir() and built(entry.folder):
            if not writable:
                _warn_read_only(entry.root)
            _check_on_load(entry, writable)
            return entry.folder
        if not writable:
            raise _refuse_build(entry)
        try:
            _build(entry, fill, need)
        except OutputExistsError:  # built by a process that could not take the lock (unreadable lock file)
            if rebuild or not entry.folder.is_dir():
                raise
            _check_on_load(entry, writable)
    return entry.folder


def _check_on_load(entry: CacheEntry, writable: bool = True) -> None:
    pending = entry.key in _pending(entry.root)
    if not (entry.folder / MANIFEST).is_file():
        _adopt(entry)
    else:
        check(entry, hashes=pending)
    if pending and writable:
        _mark_pending(entry.root, [entry.key], add=False)


def verify(entry: CacheEntry) -> str | None:
    """None when ``entry`` matches its manifest (hashes included), else "corrupt (what is wrong):
    run ..."; an entry without a manifest is adopted (see the module docstring)."""
    if not note_crashes(entry.root):
        _warn_read_only(entry.root)
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


def remove(entry: CacheEntry) -> None:
    """Remove an entry (one no load will ask for again): moved aside in one step, then deleted."""
    with entry_lock(entry):
        if entry.folder.is_dir():
            tmp = scratch_dir(f".{entry.folder.name}.tmp-", entry.folder.parent)
            try:
                os.replace(entry.folder, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _mark_pending(entry.root, [entry.key], add=False)


def _build(entry: CacheEntry, fill: Callable[[Path], None], need: Callable[[], float | None] | None) -> None:
    """Fill a tagged temporary folder, write its manifest, move it into place (caller holds the lock);
    a write fault is one OutputWriteError, with the temporary folder removed."""
    parent = entry.folder.parent
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _check_space(entry, need() if need else None)
        remove_stale(parent, _TMP)
        tmp = scratch_dir(f".{entry.folder.name}.tmp-", parent)
        fill(tmp)
        write_manifest(tmp)
        tmp.chmod(0o755)
        install(tmp, entry.folder, entry.folder.exists())  # an old entry ends up in tmp
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except Exception as e:
        if not is_io_error(e):
            raise
        raise OutputWriteError(f"cannot build the cache of '{entry.name}' in {parent}: {_reason(e)}; "
                               "nothing was written") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _mark_pending(entry.root, [entry.key], add=False)


def _check_space(entry: CacheEntry, need: float | None) -> None:
    if not need:
        return
    free = shutil.disk_usage(entry.folder.parent).free
    if free < need * 1.05 + 16 * 2**20:
        raise OutputWriteError(f"not enough space for the cache of '{entry.name}': about {need / 2**20:,.0f} "
                               f"MiB needed, {free / 2**20:,.0f} MiB free in {entry.folder.parent}; free "
                               "some or set CODEPRUNE_CACHE to a folder on a larger disk")


def _reason(e: Exception) -> str:
    """The OS's words for a write fault (safetensors wraps them: ``I/O error: No space left on device
    (os error 28) at path ...``)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"I/O error: (.+?) \(os error \d+\)", str(e))
    return m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
