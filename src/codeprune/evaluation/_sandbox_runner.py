"""The sandbox runner: runs ONE untrusted Python program and reports how it ended.

Executed as a script (``python -I _sandbox_runner.py``) by ``codeprune.evaluation.sandbox``,
never imported: it uses the standard library only, so it starts in milliseconds
and never loads torch. It reads a JSON job on stdin and writes a JSON result on
stdout. Layers, from the outside in:

- this runner is a child subreaper (PR_SET_CHILD_SUBREAPER), so every process the
  program starts, even a double-forked daemon, stays its descendant and is killed
  at the end;
- the program runs in a new session, in new network (only loopback) and mount
  namespaces where the OS allows (root, or unprivileged user namespaces), inside
  a minimal read-only root with private size-limited tmpfs at /tmp, /var/tmp,
  /dev/shm and its working folder (``_sandbox_mounts.py``; a refused step leaves
  the host's file system, and the result says which protections held), under
  rlimits (CPU seconds, address space, processes, file size, open files, no core
  dumps), as a throwaway uid when the runner is root, with an environment of its
  own (nothing inherited);
- SIGTERM (codeprune interrupted, or dead: PR_SET_PDEATHSIG) makes the runner
  kill the program's whole tree, remove the folders it was given, and exit;
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
import _sandbox_mounts as _mounts  # noqa: E402  (standard library only, like this file)

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


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        out[int(entry)] = int(fields[1])  # fields[0] is the state, fields[1] the parent pid
    return out


def _descendants(root: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the throwaway ``uid``: a child of ours takes that uid and
    calls kill(-1), which reaches all of them at once, however many and wherever they are."""
    if not _uid_processes(uid):
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            me = os.getpid()
            for _ in range(1000):
                os.kill(-1, signal.SIGKILL)  # every process of this uid except the caller
                if not [p for p in _uid_processes(uid) if p != me]:
                    os._exit(0)
                time.sleep(0.001)
        except ProcessLookupError:
            os._exit(0)  # none left
        except BaseException:
            os._exit(1)
        os._exit(1)
    os.waitpid(pid, 0)


def _uid_processes(uid: int) -> list[int]:
    """The live processes of ``uid``. Zombies do not count: those of our children are reaped
    only after the kill, and waiting for them to vanish would spin until the loop gives up."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid and not _dead(entry):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _dead(pid: str) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


def _kill_descendants(uid) -> None:
    """Kill every descendant of this runner (orphans are re-parented here, as a subreaper) and reap.

    With a throwaway uid, kill(-1) as that uid first. Then the process tree is frozen
    (SIGSTOP, repeated until no new process appears: a stopped process cannot fork)
    and killed, so a fork bomb cannot refill the slots it is given back."""
    me = os.getpid()
    if uid is not None:
        _kill_uid(uid)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        stopped: set[int] = set()
        while True:
            fresh = [p for p in _descendants(me) if p not in stopped]
            if not fresh:
                break
            for p in fresh:
                try:
                    os.kill(p, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
                stopped.add(p)
        if not stopped:
            break
        for p in stopped:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap()
        time.sleep(0.005)
    _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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
        _kill_descendants(_STATE["uid"])
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
    """In the child: new network and mount namespaces, then the minimal root. Never raises:
    what fails is left as it is and reported."""
    held = {"network_ns": False, "mount": False}
    want_net = job.get("network_isolation", True)
    want_mnt = job.get("mount_isolation", True)
    flags = (CLONE_NEWNET if want_net else 0) | (CLONE_NEWNS if want_mnt else 0)
    if not flags:
        return held
    userns = not root
    if libc.unshare(flags | (CLONE_NEWUSER if userns else 0)) != 0 and want_mnt:
        flags &= ~CLONE_NEWNS  # e.g. mount namespaces refused: try the network alone
        if libc.unshare(flags | (CLONE_NEWUSER if userns else 0)) != 0:
            return held
    if userns:
        _map_own_ids()
    held["network_ns"] = bool(flags & CLONE_NEWNET)
    if flags & CLONE_NEWNS:
        try:
            held.update(_mounts.enter_minimal_root(
                workdir=job["workdir"], source=source, uid=job.get("uid"),
                prefixes=job.get("prefixes", []), tmpfs_bytes=int(job.get("tmpfs_bytes", 32 << 20))))
        except OSError as e:
            held["mount_error"] = str(e)[:200]
    return held


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

    def preexec() -> None:  # in the child, before exec: order matters
        os.setsid()
        held = _isolate(job, libc, source, root)
        os.write(setup_w, json.dumps(held).encode())
        _limits(job)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
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
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
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
    _kill_descendants(uid)  # and whatever left the session (setsid, double fork)
    os.set_blocking(result_r, False)
    try:
        report = os.read(result_r, 65536).decode("utf-8", "replace")
    except BlockingIOError:
        report = ""
    os.close(result_r)

    lines = report.splitlines()
    network = next((ln[4:] for ln in lines if ln.startswith("net ")), None)
    status, detail = _status(job, lines, nonce, returncode, timed_out, cpu_used, seconds)
    protections = {"network": bool(held.pop("network_ns", False)) and network == "lo"}
    protections.update({k: bool(held.get(k)) for k in _mounts.PROTECTIONS})
    protections["uid_drop"] = uid is not None
    json.dump({
        "status": status, "detail": detail, "returncode": returncode, "seconds": seconds,
        "network": network, "stdout": _tail(out_path), "stderr": _tail(err_path),
        "protections": protections, "mount_error": held.get("mount_error"),
    }, sys.stdout)


if __name__ == "__main__":
    main()
