"""The sandbox runner: runs ONE untrusted Python program and reports how it ended.

Executed as a script (``python -I _sandbox_runner.py``) by ``codeprune.evaluation.sandbox``,
never imported: it uses the standard library only, so it starts in milliseconds
and never loads torch. It reads a JSON job on stdin and writes a JSON result on
stdout. Layers, from the outside in:

- this runner is a child subreaper (PR_SET_CHILD_SUBREAPER), so every process the
  program starts, even a double-forked daemon, stays its descendant and is killed
  at the end;
- the program runs in a new session, in new IPC (its SysV shared memory, message
  queues, semaphores and POSIX message queues vanish with it), network (only
  loopback) and mount namespaces where the OS allows (root, or unprivileged user
  namespaces), inside a minimal read-only root with private size-limited tmpfs at
  /tmp, /var/tmp, /dev/shm and its working folder (``_sandbox_mounts.py``; a
  refused step leaves the host's file system, and the result says which
  protections held), under
  rlimits (CPU seconds, address space, processes, file size, open files, no core
  dumps), as a throwaway uid when the runner is root, with an environment of its
  own (nothing inherited), and PR_SET_PDEATHSIG(SIGKILL): it dies with this runner;
- SIGTERM (codeprune interrupted, or dead: PR_SET_PDEATHSIG) makes the runner
  kill the program's whole tree (``_sandbox_kill.py``), remove the folders it was
  given, and exit;
- setup steps that fail leave the program on the host as far as they got (never an
  error of the program); a log folder that cannot be written (full /tmp) is
  reported as ``{"infra": ...}``, which codeprune raises instead of scoring;
- the program passes only if a driver reaches the end of it and writes a random
  nonce to a pipe that only the driver knows: ``sys.exit(0)`` or ``os._exit(0)``
  before the tests run cannot claim success. (A program written against this
  driver can still find the nonce in the driver's frame: code that runs in the
  process that runs its tests can always forge their outcome, in any harness.
  The sandbox contains damage; it does not make deliberate cheating impossible.)
"""

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves its folder out
import _sandbox_kill as _kill  # noqa: E402  (standard library only, like this file)
import _sandbox_mounts as _mounts  # noqa: E402

CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = _mounts.CLONE_NEWNS
CLONE_NEWUSER = 0x10000000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

# Runs inside the sandboxed interpreter. The nonce lives in a local of a function,
# out of reach of the program's globals.
DRIVER = r'''
import os, sys
def _run(nonce_fd, result_fd):
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    try:
        import socket
        ifaces = ",".join(sorted(n for _, n in socket.if_nameindex()))
    except Exception:
        ifaces = "?"
    os.write(result_fd, ("net " + ifaces + "\n").encode())
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["program.py"]
    scope = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), scope)
    except BaseException as e:  # SystemExit too: leaving early is not passing
        os.write(result_fd, ("exc " + type(e).__name__ + ": " + repr(str(e))[:300] + "\n").encode())
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(1)
    os.write(result_fd, b"ok " + nonce + b"\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
_run(int(sys.argv[1]), int(sys.argv[2]))
'''


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


_STATE: dict = {"uid": None, "dirs": ()}  # what the SIGTERM handler cleans up


def _on_terminate(signum, frame) -> None:
    """codeprune is stopping (an interrupt) or died (PR_SET_PDEATHSIG): kill the program's
    whole tree, remove the folders this runner was given, and go."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _kill.kill_descendants(_STATE["uid"])
    finally:
        for d in _STATE["dirs"]:
            shutil.rmtree(d, ignore_errors=True)
        os._exit(128 + signum)


def _tie_to_parent(parent: int, libc) -> None:
    """Get SIGTERM when codeprune dies. The kernel sends it when the *thread* that started
    this runner exits: run_program's caller, or a pool thread of run_programs, which lives
    until every program of the batch is over, so it never fires early."""
    signal.signal(signal.SIGTERM, _on_terminate)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl
        _on_terminate(signal.SIGTERM, None)


def _isolate(job: dict, libc, source: bytes, root: bool) -> dict:
    """In the child: new IPC, network and mount namespaces, then the minimal root. Never raises:
    what fails is left as it is and reported (``mount_error``).

    The IPC namespace is always asked for: SysV shared memory, message queues and
    semaphores, and POSIX message queues, made by the program vanish with it instead
    of outliving the program on the host."""
    held = {"network_ns": False, "mount": False, "ipc": False}
    try:
        return _unshare_and_mount(job, libc, source, root, held)
    except Exception as e:  # e.g. an unexpected kernel: run on the host as far as it got
        held["mount_error"] = _reason(e)
        return held


def _unshare_and_mount(job: dict, libc, source: bytes, root: bool, held: dict) -> dict:
    want_net = job.get("network_isolation", True)
    want_mnt = job.get("mount_isolation", True)
    flags = CLONE_NEWIPC | (CLONE_NEWNET if want_net else 0) | (CLONE_NEWNS if want_mnt else 0)
    user = 0 if root else CLONE_NEWUSER
    if libc.unshare(flags | user) != 0:
        if not flags & CLONE_NEWNS:
            return held
        flags &= ~CLONE_NEWNS  # e.g. mount namespaces refused: try the others alone
        if libc.unshare(flags | user) != 0:
            return held
    if user:
        _map_own_ids()
    held["network_ns"] = bool(flags & CLONE_NEWNET)
    held["ipc"] = True
    if flags & CLONE_NEWNS:
        try:
            held.update(_mounts.enter_minimal_root(
                workdir=job["workdir"], source=source, uid=job.get("uid"),
                prefixes=job.get("prefixes", []), tmpfs_bytes=int(job.get("tmpfs_bytes", 32 << 20))))
        except Exception as e:  # never raises, see _isolate
            held["mount_error"] = _reason(e)
    return held


def _reason(e: Exception) -> str:
    return (str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}")[:200]


def _map_own_ids() -> None:
    """In a new user namespace: keep our own uid and gid (the program gets no capabilities)."""
    uid, gid = os.getuid(), os.getgid()
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass


def _limits(job: dict) -> None:
    cpu = int(job["cpu_seconds"])
    for which, value in [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (job["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (job["file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (job["max_processes"],) * 2),
    ]:
        resource.setrlimit(which, value)


def _start(job: dict, libc, source: bytes, nonce_r: int, result_w: int, out, err):
    """Start the driver in its sandbox: (Popen, {protection: held})."""
    uid = job.get("uid")
    root = os.geteuid() == 0
    setup_r, setup_w = os.pipe()  # the child says what held; closed before exec (not in pass_fds)
    runner = os.getpid()

    def preexec() -> None:  # in the child, before exec: order matters
        os.setsid()
        held = _isolate(job, libc, source, root)
        os.write(setup_w, json.dumps(held).encode())
        _limits(job)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # The program dies with this runner (codeprune SIGKILLs a runner that ignores SIGTERM).
        # After the credential change, which clears it; then make sure we were not orphaned already.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != runner:
            os._exit(1)
        os.umask(0o077)

    try:
        proc = subprocess.Popen(
            [job["python"], "-I", "-c", DRIVER, str(nonce_r), str(result_w)],
            cwd=job["workdir"], env=job["env"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            pass_fds=(nonce_r, result_w), preexec_fn=preexec, close_fds=True,
        )
    finally:
        os.close(setup_w)
    os.set_blocking(setup_r, False)
    try:
        held = json.loads(os.read(setup_r, 65536) or b"{}")
    except (BlockingIOError, ValueError):
        held = {}
    os.close(setup_r)
    return proc, held


def _full(path: str) -> bool:
    """Whether the file system of ``path`` has no free block or inode left (for non-root users)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return (st.f_blocks > 0 and st.f_bavail == 0) or (st.f_files > 0 and st.f_favail == 0)


def _status(job, lines, nonce, returncode, timed_out, cpu_used, seconds) -> tuple[str, str]:
    exc = next((ln[4:] for ln in lines if ln.startswith("exc ")), None)
    ok = any(ln == "ok " + nonce.decode() for ln in lines)
    cpu_kill = not timed_out and not ok and (
        returncode == -signal.SIGXCPU
        or (returncode == -signal.SIGKILL and cpu_used >= int(job["cpu_seconds"]) - 0.05))
    if timed_out:
        return "timeout", f"wall-clock limit: killed after {seconds:.1f} s"
    if cpu_kill:
        return "timeout", f"CPU limit: killed after {seconds:.1f} s"
    if ok and returncode == 0:
        return "passed", ""
    if exc and exc.startswith("AssertionError"):
        return "failed", exc
    if exc:
        return "error", exc
    if returncode < 0:
        return "error", f"killed by signal {-returncode}"
    return "error", f"exited with code {returncode} before the end of the program"


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # codeprune stops us with SIGTERM, not the terminal's ^C
    libc = ctypes.CDLL(None, use_errno=True)
    _tie_to_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid(), libc)
    job = json.load(sys.stdin)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    workdir, logdir = job["workdir"], job["logdir"]
    uid = _STATE["uid"] = job.get("uid")
    _STATE["dirs"] = (workdir, logdir)
    with open(os.path.join(workdir, "program.py"), "rb") as f:
        source = f.read()
    timeout = float(job["timeout"])
    nonce = os.urandom(16).hex().encode()  # (secrets would cost its imports)
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)

    out_path, err_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
    start = time.monotonic()
    timed_out = False
    cpu_used = 0.0
    try:
        out, err = open(out_path, "wb"), open(err_path, "wb")
    except OSError as e:  # codeprune's own failure (full /tmp), not the program's
        json.dump({"infra": {"errno": e.errno, "path": logdir, "message": e.strerror}}, sys.stdout)
        return
    with out, err:
        try:
            proc, held = _start(job, libc, source, nonce_r, result_w, out, err)
        except (OSError, subprocess.SubprocessError) as e:
            json.dump({"status": "error", "detail": f"cannot start the sandbox: {e}"}, sys.stdout)
            return
        os.close(nonce_r)
        os.close(result_w)
        try:
            returncode = proc.wait(timeout=timeout)
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the program's CPU time
            cpu_used = usage.ru_utime + usage.ru_stime
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            returncode = proc.wait()
    seconds = time.monotonic() - start
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its session
    except (ProcessLookupError, PermissionError):
        pass
    _kill.kill_descendants(uid)  # and whatever left the session (setsid, double fork)
    os.set_blocking(result_r, False)
    try:
        report = os.read(result_r, 65536).decode("utf-8", "replace")
    except BlockingIOError:
        report = ""
    os.close(result_r)

    lines = report.splitlines()
    network = next((ln[4:] for ln in lines if ln.startswith("net ")), None)
    status, detail = _status(job, lines, nonce, returncode, timed_out, cpu_used, seconds)
    if status != "passed" and _full(logdir):  # its output could not be written: not its fault
        json.dump({"infra": {"errno": 28, "path": logdir, "message": os.strerror(28)}}, sys.stdout)
        return
    protections = {"network": bool(held.pop("network_ns", False)) and network == "lo"}
    protections.update({k: bool(held.get(k)) for k in _mounts.PROTECTIONS})
    protections["ipc"] = bool(held.get("ipc"))
    protections["uid_drop"] = uid is not None
    json.dump({
        "status": status, "detail": detail, "returncode": returncode, "seconds": seconds,
        "network": network, "stdout": _tail(out_path), "stderr": _tail(err_path),
        "protections": protections, "mount_error": held.get("mount_error"),
    }, sys.stdout)


if __name__ == "__main__":
    main()
