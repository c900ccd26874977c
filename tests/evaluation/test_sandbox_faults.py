"""Review findings on the code sandbox (issue 14, items 3, 8, 9): IPC objects that outlived their
program, a program that outlived its runner, setup errors that were not OSError, and a full
/tmp scored as a model result. Every program runs for real (~0.1 s each).

    .venv/bin/python -m pytest -q tests/evaluation/test_sandbox_faults.py
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from codeprune.errors import OutputWriteError
from codeprune.evaluation import sandbox
from codeprune.evaluation._sandbox_mounts import kernel_version
from codeprune.evaluation.sandbox import LOG_PREFIX, WORK_PREFIX, SandboxLimits, run_program, run_programs
from codeprune.outputs import process_tag

LIMITS = SandboxLimits(timeout=10, uid_base=1_950_000_000)
IS_ROOT = os.geteuid() == 0
EVAL_DIR = Path(sandbox.__file__).parent


def _ipc_entries() -> set[str]:
    out = set()
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                out |= {f"{kind} {line.split()[1]}" for line in f.readlines()[1:] if line.strip()}
        except OSError:
            pass
    try:
        out |= {f"mqueue {n}" for n in os.listdir("/dev/mqueue")}
    except OSError:
        pass
    return out


IPC_PROGRAM = """
import ctypes, ctypes.util
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
assert libc.shmget(0, 8 << 20, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
assert libc.msgget(0, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
assert libc.semget(0, 1, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()
try:  # POSIX message queue: in libc since glibc 2.34, librt before
    mq_open = libc.mq_open
except AttributeError:
    mq_open = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1").mq_open
mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
print("mq", mq_open(b"/codeprune-sandbox-test", 0o100 | 2, 0o600, None))  # O_CREAT | O_RDWR
"""


@pytest.mark.parametrize("mount_isolation", [True, False], ids=["minimal-root", "host-fs"])
def test_ipc_objects_vanish_with_the_program(mount_isolation):
    before = _ipc_entries()
    limits = SandboxLimits(timeout=10, uid_base=LIMITS.uid_base, mount_isolation=mount_isolation)
    res = run_program(IPC_PROGRAM, limits=limits)
    if not res.protections.get("ipc"):
        pytest.skip(f"no IPC namespace here: {res.extra.get('mount_error')}")
    assert res.status == "passed", res
    assert _ipc_entries() - before == set()  # the segment, the queues, the semaphore: gone


def test_ipc_is_a_reported_protection():
    from types import SimpleNamespace

    from codeprune.reporting.markdown import _humaneval_lines

    box = sandbox.check_sandbox(LIMITS)
    assert "ipc" in box["protections"]
    he = SimpleNamespace(config={"completions": "x.jsonl"}, pass_at_k={"pass@1": 1.0}, n_problems=1,
                         statuses={"passed": 1, "failed": 0, "timeout": 0, "error": 0}, sandbox=box)
    line = "\n".join(_humaneval_lines(he))
    assert ("private IPC" in line) == box["protections"]["ipc"]


# -- the program dies with its runner ------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def _runners() -> list[int]:
    out = []
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"_sandbox_runner.py" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def test_the_program_dies_with_its_runner():
    results = []
    limits = SandboxLimits(timeout=30, uid_base=LIMITS.uid_base)
    sleeper = "import time\ntime.sleep(600)\n"
    t = threading.Thread(target=lambda: results.append(run_program(sleeper, limits=limits)))
    t.start()
    deadline, programs = time.monotonic() + 15, []
    while time.monotonic() < deadline and not programs:
        runners = _runners()
        programs = [p for r in runners for p in _children(r)]
        time.sleep(0.05)
    assert programs, "the program never started"
    time.sleep(0.3)  # past its preexec
    os.kill(runners[0], signal.SIGKILL)  # what _Runners.stop does to a runner that ignores SIGTERM
    deadline = time.monotonic() + 1.0
    while any(_alive(p) for p in programs) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [p for p in programs if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    t.join(10)
    assert left == [], "the program outlived its runner"
    assert results and results[0].status == "error"


# -- setup errors other than OSError fall back instead of failing the program ----------------------

def test_kernel_releases_parse():
    assert kernel_version("6.1-rc1+") == (6, 1)
    assert kernel_version("6.1.0-rc1+") == (6, 1)
    assert kernel_version("5.15.0-91-generic") == (5, 15)
    assert kernel_version("4.19.0+") == (4, 19)
    assert kernel_version("weird") == (0, 0)
    assert kernel_version() >= (0, 0)


RUN_PATCHED = """
import json, os, sys
sys.path.insert(0, {eval_dir!r})
sys.argv = ["runner", str(os.getppid())]
import _sandbox_mounts as m
import _sandbox_runner as r
{patch}
r.main()
"""

PATCHES = {
    "odd-release": "real = os.uname()\n"
                   "os.uname = lambda: type(real)(real[:2] + ('6.1-rc1+',) + real[3:])\n",
    "etc-raises": "def boom(root):\n    raise ValueError('boom')\nm._etc = boom\n",
    "mounts-raise": "def boom(**kw):\n    raise KeyError('boom')\nm.enter_minimal_root = boom\n",
}


def _run_patched(patch: str) -> dict:
    """The real runner, with ``patch`` applied inside it, on a program printing its folder."""
    uid = sandbox.sandbox_uid(LIMITS, 7) if IS_ROOT else None
    workdir, logdir = sandbox.scratch_dir(WORK_PREFIX), sandbox.scratch_dir(LOG_PREFIX)
    try:
        sandbox._write_program(workdir, "import os\nprint(os.getcwd())\n", uid)
        job = sandbox._job(workdir, logdir, LIMITS, uid, sandbox.interpreter())
        code = RUN_PATCHED.format(eval_dir=str(EVAL_DIR), patch=patch)
        proc = subprocess.run([sys.executable, "-I", "-c", code], input=json.dumps(job), text=True,
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    finally:
        for d in (workdir, logdir):
            subprocess.run(["rm", "-rf", str(d)], check=False)


def test_an_odd_kernel_release_keeps_every_protection():
    if not sandbox.check_sandbox(LIMITS)["protections"].get("minimal_root"):
        pytest.skip("no mount namespace here")
    res = _run_patched(PATCHES["odd-release"])
    assert res["status"] == "passed", res
    assert res["protections"]["minimal_root"] and res["protections"]["private_proc"], res
    assert res["mount_error"] is None


@pytest.mark.parametrize("patch,kind", [("etc-raises", "ValueError"), ("mounts-raise", "KeyError")])
def test_a_setup_exception_falls_back_and_says_why(patch, kind):
    if not sandbox.check_sandbox(LIMITS)["protections"].get("mount"):
        pytest.skip("no mount namespace here")
    res = _run_patched(PATCHES[patch])
    assert res["status"] == "passed", res  # the program ran, on the host's file system
    assert not res["protections"]["minimal_root"] and res["protections"]["ipc"]
    assert res["mount_error"].startswith(kind) and "boom" in res["mount_error"]
    assert res["stdout"].strip().startswith(tempfile.gettempdir())


# -- codeprune's own write failures stop the run, never score a program ----------------------------

def _mine() -> list[str]:
    tag = process_tag()
    names = os.listdir(tempfile.gettempdir())
    return [n for n in names if n.startswith((WORK_PREFIX + tag, LOG_PREFIX + tag))]


def test_a_full_tmp_while_writing_a_program_stops_the_run(monkeypatch):
    real, calls = sandbox._write_program, []

    def write(workdir, source, uid):
        calls.append(workdir)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(workdir, source, uid)

    monkeypatch.setattr(sandbox, "_write_program", write)
    start = time.monotonic()
    with pytest.raises(OutputWriteError, match="cannot write its temporary folder .*No space left on device"):
        run_programs(["import time\ntime.sleep(600)\n"] * 8, workers=3,
                     limits=SandboxLimits(timeout=30, uid_base=LIMITS.uid_base))
    assert time.monotonic() - start < 10  # the running programs were stopped, not awaited
    assert len(calls) == 3  # the third of three workers failed; none started after it
    deadline = time.monotonic() + 3
    while (_mine() or _runners()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mine() == [] and _runners() == []


@pytest.mark.skipif(not IS_ROOT, reason="mounts a small tmpfs as the temporary folder")
def test_a_full_log_folder_is_not_the_programs_fault(monkeypatch, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(small))
        real = sandbox._write_program

        def write_then_fill(workdir, source, uid):
            real(workdir, source, uid)
            with open(small / "filler", "wb") as f:  # someone else fills /tmp
                try:
                    f.write(b"x" * (1 << 20))
                except OSError:
                    pass

        monkeypatch.setattr(sandbox, "_write_program", write_then_fill)
        with pytest.raises(OutputWriteError, match="No space left on device"):
            run_program(textwrap.dedent("""
                import sys
                sys.stdout.write("x" * 300_000)
                sys.stdout.flush()
            """), limits=LIMITS)
        assert sorted(os.listdir(small)) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
