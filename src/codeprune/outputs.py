"""Where codeprune writes: output checks before work, atomic writes, owned temporary folders.

    out = check_output("runs/wanda50", False, inputs=["smollm2-135m"], expected_bytes=300e6)
    write_atomically("runs/wanda50", False, lambda tmp: (tmp / "a.json").write_text("{}"))
    write_file_atomically("data/instr.jsonl", False, lambda f: f.write("{}\\n"))
    work = scratch_dir("codeprune-sandbox-")          # /tmp/codeprune-sandbox-<pid>_<start>_<host>-x1y2

Every output location is checked before any work (``check_output``): the nearest
existing folder on the way must be a folder, writable, outside the input model,
with room for ``expected_bytes``; an existing output is refused unless
``overwrite``. The check also claims the output for this process (a lock file
beside it), so a second run writing the same place fails at once instead of
after minutes of work.

``fill`` writes into a hidden temporary folder beside the target, which is then
moved into place in one step: renameat2(RENAME_NOREPLACE) for a new output (a
concurrent writer that got there first makes this one fail with
OutputExistsError, and the winner's folder stays whole), renameat2(RENAME_EXCHANGE)
to replace one (the previous output stays whole until the instant of the swap,
even under SIGKILL). An OSError while writing (no space, quota, read-only,
permission) becomes OutputWriteError, and nothing is left behind.

Every temporary folder or file codeprune makes carries its owner's tag,
``<pid>_<start time>_<host>`` (the start time tells a reused pid apart; the host,
8 hex digits of its name, keeps a shared folder's other machines out of it). A
process killed with SIGKILL cannot clean up: ``remove_stale`` (run by the next
``check_output`` on that folder, by the sandbox on the temporary folder, by the
model cache on its root) removes those whose owner is gone; a previous output
that a writer without renameat2 had moved aside (``.NAME.old-<tag>``) when it
died is put back first. Before the move every folder inside becomes mode 0755 and
every file 0644 (mkdtemp makes 0700 and transformers writes safetensors 0600), so
other users of a shared machine can read a checkpoint. ``check_output`` refuses
an output that is your home folder or holds the current folder (``--out .``
with ``--overwrite`` would replace it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from codeprune.errors import OutputExistsError, OutputWriteError

_TAG = re.compile(r"(\d+)_(\d+)(?:_([0-9a-f]{8}))?-")
_LOCK_SUFFIX = ".codeprune-lock"
_HELD: dict[Path, int] = {}  # claimed outputs of this process -> the lock file's descriptor


# --- owner tags and stale temporary folders -------------------------------------------------

def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: fall back to "the pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def _host() -> str:
    """8 hex digits naming this machine (its host name): a shared folder (NFS, a cache mounted in
    containers) holds other machines' folders, whose pids mean nothing here."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def process_tag(pid: int | None = None) -> str:
    """``<pid>_<start time>_<host>`` of a process (this one by default): names its temporary files."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}_{_start_time(pid) or 0}_{_host()}"


def owner_alive(tag: str) -> bool:
    """Whether the process a tag names still runs (the same process, not a reused pid). Tags of
    another machine are not ours to judge: alive."""
    m = _TAG.match(tag + "-")
    if m is None or (m.group(3) is not None and m.group(3) != _host()):
        return True
    pid, start = int(m.group(1)), int(m.group(2))
    now = _start_time(pid)
    return now is not None and (start == 0 or now in (0, start))


def scratch_dir(prefix: str, dir: str | Path | None = None) -> Path:
    """A new private folder ``<dir>/<prefix><tag>-<random>`` (dir: the system's temporary folder)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{process_tag()}-", dir=dir))


def scratch_file(prefix: str, dir: str | Path) -> tuple[int, Path]:
    """A new private file ``<dir>/<prefix><tag>-<random>``: (open descriptor, path)."""
    fd, path = tempfile.mkstemp(prefix=f"{prefix}{process_tag()}-", dir=dir)
    return fd, Path(path)


def remove_stale(dir: str | Path, prefix: str | re.Pattern = "") -> list[Path]:
    """Remove the entries of ``dir`` named ``<prefix><tag>-...`` whose owner process is gone.

    ``prefix`` is a literal start or a compiled pattern matched at the start of the name."""
    removed = []
    try:
        names = os.listdir(dir)
    except OSError:
        return removed
    for name in names:
        if isinstance(prefix, re.Pattern):
            m = prefix.match(name)
            rest = name[m.end():] if m else None
        else:
            rest = name[len(prefix):] if name.startswith(prefix) else None
        m = _TAG.match(rest) if rest is not None else None
        if m is None or owner_alive(m.group(0)[:-1]):
            continue
        path = Path(dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# hidden siblings that write_atomically / write_file_atomically make: .<name>.tmp-<tag>-...
_SIBLINGS = re.compile(r"\..+\.(tmp|old)-")
_OLD = re.compile(r"\.(.+)\.old-")


def _remove_stale_siblings(folder: Path) -> None:
    """Remove what dead writers left beside their outputs, after putting back a previous output
    that a writer without renameat2 had moved aside when it died (``install``'s fallback)."""
    for name in os.listdir(folder):
        m = _OLD.match(name)
        tag = _TAG.match(name[m.end():]) if m else None
        if tag and not owner_alive(tag.group(0)[:-1]) and not (folder / m.group(1)).exists():
            os.replace(folder / name, folder / m.group(1))
    remove_stale(folder, _SIBLINGS)
    for lock in folder.glob(f".*{_LOCK_SUFFIX}"):
        if lock.with_name(lock.name[1:-len(_LOCK_SUFFIX)]).absolute() not in _HELD:
            _remove_if_unlocked(lock)


# --- checks before work ---------------------------------------------------------------------

def _existing_ancestor(path: Path) -> Path:
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _inside(a: Path, b: Path) -> bool:
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


def check_output(out: str | Path, overwrite: bool, *, inputs=(), expected_bytes: float | None = None,
                 kind: str = "folder", claim: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written; claim it for this process.

    ``inputs`` are the paths read (a model folder, a data file): the output may be
    neither inside one nor one of them. ``expected_bytes``: the size about to be
    written, checked against the free space. ``kind``: "folder" or "file". ``claim``: False in
    the processes of a distributed run that do not write (only rank 0 claims)."""
    out = Path(out).expanduser()
    whole = out.resolve()
    if whole == Path.home().resolve() or Path(os.path.abspath(os.curdir)).resolve().is_relative_to(whole):
        raise OutputWriteError(f"refusing to write {out}: it is your home folder or holds the current folder")
    if out.exists() or out.is_symlink():
        if kind == "folder" and not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a folder")
        if kind == "file" and out.is_dir():
            raise OutputExistsError(f"output path {out} is a folder: give a file name")
        if not overwrite:
            what = "folder" if kind == "folder" else "file"
            raise OutputExistsError(f"output {what} {out} exists: pass --overwrite to replace it")
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise OutputWriteError(f"cannot write {out}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(base) else "is not writable by you"
        raise OutputWriteError(f"cannot write {out}: {base} {why}")
    for src in inputs:
        src = Path(src).expanduser()
        if src.exists() and (_inside(out, src) or (src.is_dir() and _inside(src, out))):
            raise OutputWriteError(f"cannot write {out}: it would be inside or replace the input {src}")
    if expected_bytes:
        free = shutil.disk_usage(base).free
        if free < expected_bytes * 1.05 + 16 * 2**20:
            raise OutputWriteError(f"not enough space for {out}: about {_mb(expected_bytes)} needed, "
                                   f"{_mb(free)} free in {base}")
    if out.parent.is_dir() and claim:
        _remove_stale_siblings(out.parent)
        _claim(out)
    return out


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --- one writer per output ------------------------------------------------------------------

def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{_LOCK_SUFFIX}")


def _claim(out: Path) -> None:
    """Hold an exclusive lock on ``.<name>.codeprune-lock`` beside ``out`` until it is written."""
    key = out.absolute()
    if key in _HELD:
        return
    lock = _lock_path(out)
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # cannot make a lock here: the rename at the end still keeps the result whole
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"another codeprune process (pid {holder}) is writing {out}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by its previous holder between our open and flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD[key] = fd
            return
        os.close(fd)


def release(out: str | Path) -> None:
    """Give up the claim on ``out`` (after writing it, or when the run gave up)."""
    out = Path(out).expanduser()
    fd = _HELD.pop(out.absolute(), None)
    if fd is not None:
        _lock_path(out).unlink(missing_ok=True)  # unlink while locked: no one can hold a stale inode
        os.close(fd)


@contextlib.contextmanager
def claims():
    """Release, on the way out (normally or not), every output claimed inside the block:
    a run that fails after its checks leaves no lock behind (workflows wrap themselves in it)."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in [k for k in _HELD if k not in before]:
            release(key)


def _remove_if_unlocked(lock: Path) -> None:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # still the file we locked, not a new claim
            lock.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- atomic writes --------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with ``flags``; False where the kernel or file system lacks it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``out`` in one step; with ``overwrite`` an existing ``out`` ends up in ``tmp``."""
    if out.exists() and overwrite:
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            return
        old = out.with_name(f".{out.name}.old-{process_tag()}-x")
        os.replace(out, old)
        os.replace(tmp, out)
        os.replace(old, tmp)  # removed with tmp by the caller
        return
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputExistsError(f"{out} was written by another process while this one worked; "
                                "it was left as that process wrote it") from None
    if out.exists():
        raise OutputExistsError(f"{out} was written by another process while this one worked")
    os.replace(tmp, out)


def _write_error(out: Path, e: BaseException) -> OutputWriteError:
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
    return OutputWriteError(f"cannot write {out}: {reason}; nothing was written")


def is_io_error(e: Exception) -> bool:
    """An OSError, or a library's wrapper of one (safetensors reports a full disk as SafetensorError)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "os error" in str(e).lower())


def write_atomically(out: str | Path, overwrite: bool, fill, *, expected_bytes: float | None = None) -> Path:
    """Call ``fill(tmp_folder)`` then move the folder to ``out`` (replacing it if allowed);
    ``expected_bytes``: about what ``fill`` writes, checked against the free space first."""
    out = check_output(out, overwrite, expected_bytes=expected_bytes)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_dir(f".{out.name}.tmp-", out.parent)
        fill(tmp)
        _make_readable(tmp)
        install(tmp, out, overwrite)
    except OutputExistsError:
        raise
    except Exception as e:
        if is_io_error(e):
            raise _write_error(out, e) from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        release(out)
    return out


def write_file_atomically(out: str | Path, overwrite: bool, write, *, mode: str = "w") -> Path:
    """Call ``write(file_object)`` on a hidden temporary file, then move it to ``out``."""

    def to_path(tmp: Path) -> None:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)

    return write_path_atomically(out, overwrite, to_path)


def write_path_atomically(out: str | Path, overwrite: bool, write, *,
                          expected_bytes: float | None = None) -> Path:
    """Call ``write(path)`` with a hidden temporary file's path beside ``out`` (for writers
    that open the file themselves: GGUF), then move it to ``out``."""
    out = check_output(out, overwrite, kind="file", expected_bytes=expected_bytes)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = scratch_file(f".{out.name}.tmp-", out.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)
        if overwrite or not _renameat2(tmp, out, _RENAME_NOREPLACE):
            os.replace(tmp, out)
    except FileExistsError:
        raise OutputExistsError(f"{out} was written by another process while this one worked") from None
    except Exception as e:
        if is_io_error(e):
            raise _write_error(out, e) from e
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        release(out)
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
