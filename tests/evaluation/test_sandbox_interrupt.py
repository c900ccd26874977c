"""Interrupts reach the sandbox at once and leave nothing behind (issue 14, item 3).

A real child Python process runs sleeping programs in the sandbox; the test sends
it SIGINT, SIGTERM or SIGKILL and checks that it ends within ~2 s (not at the
programs' 30 s timeout) and that no process of its throwaway uids, no runner and
no ``codeprune-sandbox-*`` folder of it remains. Each case takes ~1-2 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from codeprune.evaluation.sandbox import LOG_PREFIX, WORK_PREFIX, remove_leftovers
from codeprune.outputs import process_tag

from ..conftest import default_signals

UID_BASE = 1_970_000_000
IS_ROOT = os.geteuid() == 0

CHILD = textwrap.dedent("""
    import signal, sys
    from codeprune.errors import Terminated
    from codeprune.evaluation.sandbox import SandboxLimits, run_program, run_programs

    def terminated(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, terminated)  # as the CLI does
    limits = SandboxLimits(timeout=30, uid_base={uid_base})
    sleeper = "import time\\ntime.sleep(600)\\n"
    try:
        if sys.argv[1] == "many":
            run_programs([sleeper] * 6, limits=limits, workers=3)
        else:
            run_program(sleeper, limits=limits)
    except KeyboardInterrupt:
        sys.exit(130)
    except Terminated as e:
        sys.exit(128 + e.signum)
    sys.exit(0)
""").format(uid_base=UID_BASE)


def sandbox_folders(tag: str) -> list[str]:
    tmp = tempfile.gettempdir()
    return [n for n in os.listdir(tmp) if n.startswith((WORK_PREFIX + tag, LOG_PREFIX + tag))]


def processes(pred) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if pred(int(entry)):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def of_child_uids(pid: int):
    """The throwaway uids of codeprune process ``pid`` (sandbox_uid's formula)."""
    low = UID_BASE + (pid % 65536) * 1024
    return lambda p: low <= os.stat(f"/proc/{p}").st_uid < low + 1024


def runner_of(pid: int):
    def pred(p: int) -> bool:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return any(a.endswith(b"_sandbox_runner.py") for a in argv) and str(pid).encode() in argv
    return pred


def start_child(mode: str, running: int) -> subprocess.Popen:
    """Start the child and wait until ``running`` programs run (their folders exist, plus a moment)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], preexec_fn=default_signals)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(sandbox_folders(process_tag(child.pid))) >= 2 * running:
            break
        assert child.poll() is None, "the child ended early"
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail("the sandboxed programs never started")
    time.sleep(0.5)  # the runners have started their programs
    return child


def assert_nothing_left(pid: int, tag: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = processes(runner_of(pid)) + (processes(of_child_uids(pid)) if IS_ROOT else [])
        if not left and not sandbox_folders(tag):
            return
        time.sleep(0.05)
    raise AssertionError(f"left behind: processes {left}, folders {sandbox_folders(tag)}")


@pytest.mark.parametrize("mode", ["many", "one"])
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_running_programs_at_once(mode, signum, code):
    child = start_child(mode, 3 if mode == "many" else 1)
    tag = process_tag(child.pid)
    start = time.monotonic()
    child.send_signal(signum)
    rc = child.wait(timeout=15)
    elapsed = time.monotonic() - start
    assert rc == code
    assert elapsed < 2.5, f"the interrupt took {elapsed:.1f} s"
    assert_nothing_left(child.pid, tag, within=0.5)


def test_sigkill_of_codeprune_still_ends_its_programs():
    child = start_child("many", 3)
    tag = process_tag(child.pid)
    assert processes(runner_of(child.pid))
    child.kill()  # no handler runs: the runners learn it from PR_SET_PDEATHSIG
    child.wait()
    assert_nothing_left(child.pid, tag, within=5.0)
    remove_leftovers()  # and whatever a runner could not remove, the next run does
    assert sandbox_folders(tag) == []


def test_leftovers_of_a_dead_process_are_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = process_tag(dead.pid)
    dead.wait()
    tmp = tempfile.gettempdir()
    made = [tempfile.mkdtemp(prefix=f"{p}{tag}-", dir=tmp) for p in (WORK_PREFIX, LOG_PREFIX)]
    open(os.path.join(made[0], "program.py"), "w").close()
    mine = [tempfile.mkdtemp(prefix=f"{p}{process_tag()}-", dir=tmp) for p in (WORK_PREFIX, LOG_PREFIX)]
    try:
        remove_leftovers()
        assert not any(os.path.exists(m) for m in made)
        assert all(os.path.isdir(m) for m in mine)  # a live owner's folders stay
    finally:
        for m in mine:
            os.rmdir(m)


def test_interrupt_in_process_leaves_no_descriptor():
    """The same in this process: KeyboardInterrupt is re-raised at once and every pipe is closed."""
    import threading

    from codeprune.evaluation.sandbox import SandboxLimits, run_programs

    fds = set(os.listdir("/proc/self/fd"))
    fired = []

    def interrupt() -> None:
        time.sleep(1.0)
        fired.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as in a terminal: a suite started in the background (cmd &) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_programs(["import time\ntime.sleep(600)\n"] * 6, workers=3,
                         limits=SandboxLimits(timeout=30, uid_base=UID_BASE))
    finally:
        signal.signal(signal.SIGINT, previous)
    elapsed = time.monotonic() - fired[0]
    timer.join()
    assert elapsed < 1.0, f"the interrupt took {elapsed:.2f} s"
    deadline = time.monotonic() + 2
    while set(os.listdir("/proc/self/fd")) != fds and time.monotonic() < deadline:
        time.sleep(0.02)  # the pool threads close their pipes right after
    assert set(os.listdir("/proc/self/fd")) - fds == set()
    assert_nothing_left(os.getpid(), process_tag(), within=1.0)
