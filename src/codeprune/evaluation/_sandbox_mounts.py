"""The sandbox's own mount namespace: a minimal read-only root with private, size-limited tmpfs folders.

Loaded by ``_sandbox_runner.py`` only (standard library only, never imported by
codeprune) and called in the program's child process between fork and exec, after
``unshare(CLONE_NEWNS)``, while it still holds root (real root, or root of a new
user namespace)::

    held = enter_minimal_root(workdir="/tmp/codeprune-sandbox-...", source=b"...", uid=1950000000,
                              prefixes=["/usr"], tmpfs_bytes=32 << 20)

What the program then sees as ``/``: a small tmpfs holding read-only bind mounts of
``/usr``, ``/bin``, ``/sbin``, ``/lib*`` (symlinks recreated on merged-usr systems),
the interpreter's prefix when it lives elsewhere, copies of ``/etc/ld.so.cache`` and
``/etc/localtime``, ``/etc/python3*``, four devices (null, zero, random, urandom), a
``/proc`` of its own (``hidepid=2``: only its own processes), and private tmpfs
mounts at ``/tmp``, ``/var/tmp``, ``/dev/shm`` (mode 1777) and at its working folder
(the same path as on the host, holding a copy of ``program.py``). Each tmpfs is
capped at ``tmpfs_bytes``; everything written there vanishes with the namespace.
The rest of the host (``/home``, ``/root``, ``/work``, Unix sockets in the host
``/tmp``) is not in it at all; the root itself is remounted read-only.

Any failure before ``pivot_root`` undoes the new root (the host working folder
reappears) and the caller runs the program as before; the returned dict says
which protections held (see ``PROTECTIONS``).
"""

import ctypes
import glob
import os
import platform
import re

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
ST_RELATIME = 4096
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}.get(platform.machine())
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "random", "urandom")
ETC_FILES = ("ld.so.cache", "localtime")
PROTECTIONS = ("mount", "minimal_root", "readonly_root", "private_tmp", "private_proc")

_libc = ctypes.CDLL(None, use_errno=True)


def _enc(s):
    return None if s is None else os.fsencode(s)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags: int, data=None) -> None:
    _check(_libc.mount(_enc(src), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)),
           f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(_enc(target), MNT_DETACH), f"umount {target}")


def _locked_flags(path: str) -> int:
    """The flags of the mount holding ``path`` that a user namespace may not clear on remount."""
    f = os.statvfs(path).f_flag
    out = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)  # same bits as ST_*
    return out | (MS_RELATIME if f & ST_RELATIME else 0)


def _bind_ro(src: str, dst: str) -> None:
    mount(src, dst, None, MS_BIND)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(src))


def _tmpfs(dst: str, size: int, mode: str, uid=None) -> None:
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode}{owner}")


def _system_dirs(root: str, prefixes) -> None:
    for name in SYSTEM_DIRS:
        src, dst = "/" + name, os.path.join(root, name)
        if os.path.islink(src):  # merged /usr: bin -> usr/bin
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.mkdir(dst)
            _bind_ro(src, dst)
    for prefix in prefixes:  # an interpreter outside /usr (pyenv, conda, /opt)
        if any(prefix == "/" + d or prefix.startswith(f"/{d}/") for d in SYSTEM_DIRS):
            continue
        dst = root + prefix
        os.makedirs(dst, exist_ok=True)
        _bind_ro(prefix, dst)


def _etc(root: str) -> None:
    os.mkdir(os.path.join(root, "etc"))
    for name in ETC_FILES:
        try:
            with open("/etc/" + name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        with open(os.path.join(root, "etc", name), "wb") as f:
            f.write(data)
    for src in glob.glob("/etc/python3*"):  # Debian's sitecustomize lives there
        if os.path.isdir(src) and not os.path.islink(src):
            dst = root + src
            os.mkdir(dst)
            _bind_ro(src, dst)


def _dev(root: str, tmpfs_bytes: int) -> None:
    dev = os.path.join(root, "dev")
    os.mkdir(dev)
    for name in DEVICES:
        dst = os.path.join(dev, name)
        open(dst, "wb").close()
        mount("/dev/" + name, dst, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"))
    _tmpfs(os.path.join(dev, "shm"), tmpfs_bytes, "1777")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release such as ``6.1.0-rc1+`` or ``5.15.0-91-generic``;
    (0, 0) when it does not start with two numbers (then the newer features are not assumed)."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release if release is None else release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _proc(root: str) -> bool:
    """A proc of its own where only its own processes show (hidepid is per mount since Linux 5.8);
    else a bind of the host's. True when the private one held."""
    dst = os.path.join(root, "proc")
    os.mkdir(dst)
    if kernel_version() >= (5, 8):
        try:
            mount("proc", dst, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
            return True
        except OSError:
            pass
    try:
        mount("/proc", dst, None, MS_BIND | MS_REC)
    except OSError:
        pass  # Python runs without /proc
    return False


def _populate(root: str, workdir: str, source: bytes, uid, prefixes, tmpfs_bytes: int) -> dict:
    _tmpfs(root, 16 << 20, "755")
    _system_dirs(root, prefixes)
    _etc(root)
    _dev(root, tmpfs_bytes)
    private_proc = _proc(root)
    for name in ("tmp", "var/tmp"):
        os.makedirs(os.path.join(root, name))
        _tmpfs(os.path.join(root, name), tmpfs_bytes, "1777")
    work = root + workdir
    os.makedirs(work, exist_ok=True)
    _tmpfs(work, tmpfs_bytes, "700", uid)
    with open(os.path.join(work, "program.py"), "wb") as f:
        f.write(source)
    if uid is not None:
        os.chown(os.path.join(work, "program.py"), uid, uid)
    return {"private_proc": private_proc}


def _switch_root(root: str) -> None:
    """pivot_root into ``root`` and drop the old root; chroot where pivot_root is refused."""
    old = os.path.join(root, ".oldroot")
    os.mkdir(old)
    if SYS_PIVOT_ROOT is not None and _libc.syscall(SYS_PIVOT_ROOT, _enc(root), _enc(old)) == 0:
        os.chdir("/")
        umount("/.oldroot")
        os.rmdir("/.oldroot")
        return
    os.rmdir(old)
    os.chroot(root)
    os.chdir("/")


def enter_minimal_root(*, workdir: str, source: bytes, uid, prefixes, tmpfs_bytes: int) -> dict:
    """Make the mount tree private and switch to a minimal root (see the module docstring).

    Call after unshare(CLONE_NEWNS). Returns {protection: held} (``PROTECTIONS``), plus
    ``mount_error`` when the minimal root could not be built."""
    held = dict.fromkeys(PROTECTIONS, False)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    held["mount"] = True
    root = workdir  # mounted over, in this namespace only: the host folder stays as it is
    try:
        held.update(_populate(root, workdir, source, uid, prefixes, tmpfs_bytes))
        _switch_root(root)
    except Exception as e:  # an OSError mostly; anything else falls back the same way
        try:
            umount(root)  # lazily, with everything mounted under it
        except OSError:
            pass
        os.chdir(workdir)
        held["private_proc"] = False
        held["mount_error"] = (str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}")[:200]
        return held
    held["minimal_root"] = held["private_tmp"] = True
    try:
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        held["readonly_root"] = True
    except OSError as e:
        held["mount_error"] = str(e)[:200]
    os.chdir(workdir)
    return held
