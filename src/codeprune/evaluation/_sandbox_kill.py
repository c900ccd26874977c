"""Killing a sandboxed program's whole process tree, for the sandbox runner.

Loaded by ``_sandbox_runner.py`` only (standard library only, never imported by
codeprune), which calls it when its program ended, timed out or was interrupted::

    kill_descendants(uid=1950000000)   # uid: the program's throwaway uid, or None

Two ways, both needed: as root, a helper takes the throwaway uid and calls
``kill(-1)``, which reaches every process of that uid wherever it went; then every
descendant of the runner (a child subreaper, so orphans come back to it) is
frozen with SIGSTOP until no new one appears, killed and reaped, so a fork bomb
cannot refill the slots it is given back.
"""

import os
import signal
import time


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


def kill_descendants(uid) -> None:
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
        reap()
        time.sleep(0.005)
    reap()


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
