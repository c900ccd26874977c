"""The code sandbox: hostile programs are contained, counted as not passed, and end quickly.

Every program here runs for real (one runner process each, ~0.1 s). Programs that
never end are cut by a 2 s wall clock, so the whole file takes well under 30 s.
As root, the throwaway uids (``sandbox_uid``) come from UID_BASE, away from the default
base; they also depend on this process's pid, so another test run never shares them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codeprune.evaluation.sandbox import (
    STATUSES,
    SandboxLimits,
    SandboxResult,
    check_sandbox,
    run_program,
    run_programs,
    sandbox_uid,
)

UID_BASE = 1_950_000_000
LIMITS = SandboxLimits(timeout=2, uid_base=UID_BASE)
SHORT = SandboxLimits(timeout=1, uid_base=UID_BASE)  # for programs that never end on their own
# a hostile program must be over within its timeout plus the runner's clean-up (at most ~11 s)
DEADLINE = LIMITS.timeout + 15
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: only then does the program run as a throwaway uid "
                        "(uid drop, RLIMIT_NPROC enforced, the user's files out of reach)")


def run(source: str, limits: SandboxLimits = LIMITS, **kwargs) -> SandboxResult:
    """Run a program (dedented) and check that it ended in time with a known status."""
    start = time.monotonic()
    res = run_program(textwrap.dedent(source), limits=limits, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < limits.timeout + 15, f"the sandbox took {elapsed:.1f} s: {res}"
    assert res.status in STATUSES, res
    assert res.passed == (res.status == "passed")
    return res


def processes_of(uid: int) -> list[int]:
    """Pids of the processes running as ``uid`` (zombies included)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` still exists as a process of a sandbox uid (or of anyone, when not root)."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return uid >= UID_BASE if IS_ROOT else True


def kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` at once (kill(-1) from a helper running as that uid),
    then wait until they are reaped. Only the throwaway uids of this file are ever passed."""
    helper = ("import os, sys\nuid = int(sys.argv[1])\nos.setgid(uid)\nos.setuid(uid)\n"
              "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n")
    deadline = time.monotonic() + 10
    while processes_of(uid) and time.monotonic() < deadline:
        subprocess.run([sys.executable, "-I", "-c", helper, str(uid)], check=True)
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Whatever a test asserted, leave no process of the sandbox uids behind for the next test."""
    yield
    if IS_ROOT:
        low, high = sandbox_uid(LIMITS, 0), sandbox_uid(LIMITS, 1023)
        for uid in sorted({os.stat(f"/proc/{p}").st_uid for p in os.listdir("/proc")
                           if p.isdigit() and os.path.exists(f"/proc/{p}")} & set(range(low, high + 1))):
            kill_uid(uid)


@pytest.fixture(scope="module")
def sandbox() -> dict:
    return check_sandbox(LIMITS)


# -- ordinary outcomes ----------------------------------------------------------------------------


def test_correct_program_passes():
    res = run("""
        def add(a, b):
            return a + b

        assert add(1, 2) == 3
        print("done")
    """)
    assert res.status == "passed"
    assert res.returncode == 0
    assert res.stdout == "done\n"
    assert res.detail == ""


def test_assertion_error_is_failed():
    res = run("assert 1 + 1 == 3, 'wrong sum'\n")
    assert res.status == "failed"
    assert not res.passed
    assert "AssertionError" in res.detail and "wrong sum" in res.detail


def test_syntax_error_is_error():
    res = run("def f(:\n    return 1\n")
    assert res.status == "error"
    assert "SyntaxError" in res.detail


def test_other_exception_is_error():
    res = run("raise KeyError('nope')\n")
    assert res.status == "error"
    assert "KeyError" in res.detail


def test_check_sandbox_reports_what_it_provides(sandbox):
    assert sandbox["uid_drop"] is IS_ROOT
    assert isinstance(sandbox["network_isolated"], bool)
    assert os.path.isfile(sandbox["python"])
    assert sandbox["timeout_s"] == LIMITS.timeout
    prot = sandbox["protections"]
    assert set(prot) >= {"network", "mount", "minimal_root", "readonly_root", "private_tmp", "uid_drop"}
    assert all(isinstance(v, bool) for v in prot.values())
    assert prot["network"] == sandbox["network_isolated"] and prot["uid_drop"] is IS_ROOT


# -- never ending --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "while True:\n    pass\n",
    "import time\ntime.sleep(10**6)\n",
    "import threading\nthreading.Event().wait()\n",
], ids=["infinite-loop", "sleep-forever", "wait-forever"])
def test_never_ending_program_times_out(source):
    res = run(source, SHORT)
    assert res.status == "timeout"
    assert "limit" in res.detail
    assert res.seconds < SHORT.timeout + 1


# -- leaving early is not passing ----------------------------------------------------------------


@pytest.mark.parametrize("exit_call", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
    "exit()",
    "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
], ids=["sys.exit", "os._exit", "SystemExit", "exit", "SIGTERM", "SIGKILL"])
def test_early_exit_before_a_failing_assert_does_not_pass(exit_call):
    res = run(exit_call + "\nassert False, 'the tests would fail'\n")
    assert not res.passed
    assert res.status == "error"  # a SIGKILL without the CPU time spent is no CPU limit


def test_early_exit_after_printing_does_not_pass():
    res = run("print('all tests passed', flush=True)\nimport os\nos._exit(0)\nassert False\n")
    assert res.stdout == "all tests passed\n"
    assert res.status == "error"
    assert "before the end" in res.detail


# -- processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    """
    import os
    while True:
        os.fork()
    """,
    """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """,
], ids=["plain", "retrying"])
def test_fork_bomb_is_contained(source):
    res = run(source, SHORT)
    assert not res.passed
    assert res.status in ("error", "timeout")
    if IS_ROOT:
        assert processes_of(sandbox_uid(LIMITS, 0)) == []


@needs_root  # without a throwaway uid, what escapes could not be cleaned up (it would be the user's)
def test_fork_bomb_leaving_its_session_is_contained():
    res = run("""
        import os
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()  # every child leaves the program's session
            except OSError:
                pass
    """, SHORT)
    assert not res.passed
    assert res.status == "timeout"
    assert processes_of(sandbox_uid(LIMITS, 0)) == []


@needs_root
def test_process_limit_applies():
    limits = SandboxLimits(timeout=2, uid_base=UID_BASE, max_processes=8)
    res = run("""
        import os, time
        n = 0
        try:
            for _ in range(100):
                if os.fork() == 0:
                    time.sleep(3600)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        print(n)
    """, limits)
    assert res.status == "passed", res
    assert int(res.stdout) < limits.max_processes  # the program itself is one of them
    assert processes_of(sandbox_uid(limits, 0)) == []  # the sleeping children were killed


def test_double_forked_daemon_is_killed():
    res = run("""
        import os, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # the daemon: its parent exits, it is nobody's child
                os.write(w, str(os.getpid()).encode())
                time.sleep(3600)
                os._exit(0)
            os._exit(0)
        os.close(w)
        pid = int(os.read(r, 32))
        os.kill(pid, 0)  # it is running
        print(pid)
    """)
    assert res.status == "passed", res
    pid = int(res.stdout)
    assert pid != os.getpid()
    assert not alive(pid), f"the daemon {pid} outlived the sandbox"
    if IS_ROOT:
        assert processes_of(sandbox_uid(LIMITS, 0)) == []


# -- memory and files ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "x = bytearray(8 * 2**30)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n",
], ids=["8-GiB-at-once", "growing"])
def test_huge_allocation_is_refused(source):
    res = run(source, SandboxLimits(timeout=2, uid_base=UID_BASE, memory_mb=256))
    assert res.status == "error"
    assert "MemoryError" in res.detail


def test_output_flood_is_cut():
    limits = SandboxLimits(timeout=2, uid_base=UID_BASE, file_mb=1)
    res = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits)
    assert not res.passed
    assert len(res.stdout) <= 2000  # only the tail comes back


@needs_root
def test_writing_outside_its_folder_is_refused(tmp_path: Path):
    os.chmod(tmp_path, 0o700)  # a private folder of the user (pytest's is root-owned)
    target = tmp_path / "escaped.txt"
    res = run(f"""
        with open({str(target)!r}, "w") as f:
            f.write("escaped")
    """)
    assert not res.passed
    assert res.status == "error"
    # PermissionError with the host's file system, FileNotFoundError in the minimal root
    assert "PermissionError" in res.detail or "FileNotFoundError" in res.detail
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_working_folder_is_private_and_removed():
    res = run("""
        import os
        with open("scratch.txt", "w") as f:
            f.write("mine")
        assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
        print(os.getcwd())
    """)
    assert res.status == "passed", res
    workdir = res.stdout.strip()
    assert workdir and workdir != os.getcwd()
    assert not os.path.exists(workdir)


@needs_root
def test_runs_as_a_throwaway_uid():
    uid = sandbox_uid(LIMITS, 0)
    res = run(f"""
        import os
        assert os.getuid() == os.geteuid() == {uid}
        assert os.getgid() == {uid}
        assert os.getgroups() == []
        try:
            open("/root/codeprune-sandbox-probe", "w")
        except OSError:  # not writable by it, or not there at all (the minimal root)
            pass
        else:
            raise RuntimeError("wrote into /root")
    """)
    assert res.status == "passed", res
    assert not os.path.exists("/root/codeprune-sandbox-probe")


# -- environment ----------------------------------------------------------------------------------

SECRET = "codeprune-test-secret-7f3a9c"


def test_secrets_in_the_environment_are_not_inherited(monkeypatch):
    monkeypatch.setenv("CODEPRUNE_TEST_SECRET", SECRET)
    res = run(f"""
        import os
        assert "CODEPRUNE_TEST_SECRET" not in os.environ
        assert not any({SECRET!r} in v for v in os.environ.values())
    """)
    assert res.status == "passed", res


def test_printed_environment_holds_no_secret(monkeypatch):
    monkeypatch.setenv("CODEPRUNE_TEST_SECRET", SECRET)
    res = run("import os\nfor k, v in sorted(os.environ.items()):\n    print(k, '=', v)\n")
    assert res.status == "passed", res
    assert SECRET not in res.stdout and "CODEPRUNE_TEST_SECRET" not in res.stdout
    assert "PATH = " in res.stdout  # it did print its environment


@needs_root
def test_parent_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("CODEPRUNE_TEST_SECRET", SECRET)
    res = run(f"""
        import os
        try:
            with open(f"/proc/{{os.getppid()}}/environ", "rb") as f:
                seen = f.read()
        except (PermissionError, FileNotFoundError):  # hidden by the private /proc (hidepid=2)
            seen = b""
        assert {SECRET!r}.encode() not in seen
    """)
    assert res.status == "passed", res


# -- network ------------------------------------------------------------------------------------


def test_outside_connection_does_not_pass(sandbox):
    # 192.0.2.1 (TEST-NET-1) is never routed, so the program cannot pass even without isolation
    res = run("""
        import socket
        socket.create_connection(("192.0.2.1", 80), timeout=1).close()
    """)
    assert not res.passed
    assert res.status == "error"
    if sandbox["network_isolated"]:
        assert res.network == "lo"
        assert "unreachable" in res.detail.lower()


def test_host_loopback_services_are_out_of_reach(sandbox):
    if not sandbox["network_isolated"]:
        pytest.skip("no network namespace here (neither root nor unprivileged user namespaces)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        res = run(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
        """)
        with pytest.raises(TimeoutError):
            server.accept()
    assert res.status == "error"
    assert not res.passed


# -- throwaway uids ------------------------------------------------------------------------------


def test_sandbox_uid_per_slot():
    uids = [sandbox_uid(LIMITS, slot) for slot in range(1024)]
    assert len(set(uids)) == 1024
    assert all(uid >= LIMITS.uid_base for uid in uids)
    base = sandbox_uid(SandboxLimits(uid_base=60000), 0)
    assert sandbox_uid(SandboxLimits(uid_base=70000), 0) - base == 10000
    for slot in (-1, 1024):
        with pytest.raises(ValueError):
            sandbox_uid(LIMITS, slot)


@needs_root
def test_each_worker_has_its_own_uid():
    results = run_programs(["import os, time\ntime.sleep(0.2)\nprint(os.getuid())\n"] * 4, limits=LIMITS,
                           workers=2)
    assert all(r.status == "passed" for r in results), results
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 2  # one per worker
    assert all(sandbox_uid(LIMITS, 0) <= u <= sandbox_uid(LIMITS, 1023) for u in uids)


# -- several programs ---------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def test_run_programs_keeps_input_order():
    sources = [
        "while True:\n    pass\n",  # the slowest comes first
        "print('b')\n",
        "assert False\n",
        "import time\ntime.sleep(0.3)\nprint('d')\n",
        "def f(:\n",
        "print('f')\n",
    ]
    progress = Counter()
    start = time.monotonic()
    results = run_programs(sources, limits=LIMITS, workers=2, progress=progress)
    assert time.monotonic() - start < DEADLINE
    assert [r.status for r in results] == ["timeout", "passed", "failed", "passed", "error", "passed"]
    assert [r.stdout for r in results] == ["", "b\n", "", "d\n", "", "f\n"]
    assert progress.n == len(sources)
    if IS_ROOT:
        low, high = sandbox_uid(LIMITS, 0), sandbox_uid(LIMITS, 1023)
        assert not [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}")
                    and low <= os.stat(f"/proc/{p}").st_uid <= high]


def test_run_programs_of_nothing():
    assert run_programs([], limits=LIMITS) == []
