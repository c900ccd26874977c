"""Faults end in one line and a clean disk: real signals at each phase, SIGKILL, two writers, a full disk.

Each case runs the real CLI in a child process (``python DRIVER PHASE ARGV...``). The
driver replaces one function of the phase under test with ``pause``: it prints READY
and waits (for a "go" file, or for ever), so the signal arrives exactly in that phase
and unwinds through codeprune's own frames. Every child gets a private TMPDIR, so
leftovers are seen exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import default_signals, make_tiny

DRIVER = r'''
import os, sys, time
phase, argv = sys.argv[1], sys.argv[2:]
GO = os.environ.get("FAULT_GO", "")

def pausing(real):
    def pause(*args, **kwargs):
        if real is not None and phase == "writing":
            real(*args, **kwargs)  # one file of the checkpoint is on disk
        print("READY", flush=True)
        while not (GO and os.path.exists(GO)):
            time.sleep(0.02)
        if real is not None and phase != "writing":
            return real(*args, **kwargs)
    return pause

if phase == "loading":
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained = pausing(None)
elif phase == "calibration":
    import codeprune.calibration.engine as m
    m.collect_stats = pausing(m.collect_stats)
elif phase == "pruning":
    import codeprune.methods.unstructured.wanda as m
    m.wanda_scores = pausing(m.wanda_scores)
elif phase == "writing":
    import transformers.modeling_utils as m
    m.safe_save_file = pausing(m.safe_save_file)
elif phase == "generating":
    import transformers.generation.utils as m
    m.GenerationMixin.generate = pausing(None)
from codeprune.cli import main
sys.exit(main(argv))
'''

SIGNALS = {"SIGTERM": (signal.SIGTERM, 143, "codeprune: terminated"),
           "SIGHUP": (signal.SIGHUP, 129, "codeprune: terminated"),
           "SIGINT": (signal.SIGINT, 130, "codeprune: interrupted")}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    lm = make_tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    root.mkdir()
    for i in range(6):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    return root


class Child:
    """The CLI in a child process with a private TMPDIR; records its descendants."""

    def __init__(self, tmp_path: Path, phase: str, argv: list[str], go: Path | None = None):
        self.tmpdir = tmp_path / f"tmp-{phase}-{time.monotonic_ns()}"
        self.tmpdir.mkdir()
        self.driver = tmp_path / "driver.py"
        self.driver.write_text(DRIVER)
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "FAULT_GO": str(go or ""), "TQDM_DISABLE": "1",
               "CODEPRUNE_ENERGY": "0", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(self.driver), phase, *argv], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=default_signals)
        self.seen: set[tuple[int, int]] = set()

    def wait_ready(self, timeout: float = 120) -> None:
        line = self.proc.stdout.readline()  # READY, or "" when the child ended first
        if line.strip() != "READY":
            out, err = self.proc.communicate(timeout=timeout)
            pytest.fail(f"the child never reached its phase (rc {self.proc.returncode}): {err[-2000:]}")
        self.record_descendants()

    def wait_for_programs(self, timeout: float = 120) -> None:
        """Until a sandboxed program runs (a grandchild of a sandbox runner)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tree = descendants(self.proc.pid)
            runners = [p for p in tree if "_sandbox_runner" in cmdline(p)]
            if runners and any(parent_of(p) in runners for p in tree):
                time.sleep(0.3)
                self.record_descendants()
                return
            assert self.proc.poll() is None, self.proc.communicate()[1][-2000:]
            time.sleep(0.05)
        pytest.fail("no sandboxed program started")

    def record_descendants(self) -> None:
        self.seen |= {(p, start_time(p)) for p in descendants(self.proc.pid)}

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a failing test leaves no child waiting for ever
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode, out, err

    def assert_clean(self) -> None:
        alive = [p for p, start in self.seen if start is not None and start_time(p) == start]
        assert not alive, f"processes left behind: {[cmdline(p)[:80] for p in alive]}"
        left = sorted(p.name for p in self.tmpdir.iterdir())
        assert left == [], f"temporary files left behind: {left}"


def _stat(pid: int) -> list[bytes] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    parents = {int(e): parent_of(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    found, frontier = [], {root}
    while frontier:
        kids = {p for p, pp in parents.items() if pp in frontier}
        found += kids
        frontier = kids
    return found


def prune_args(model: Path, code: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib",
            f"python:{code}", "--samples", "4", "--seq-len", "32", "--no-eval",
            "--save-dtype", "float32", "--out", str(out), *extra]


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeprune", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "CODEPRUNE_ENERGY": "0"})


def assert_signalled(rc: int, err: str, which: str) -> None:
    _, code, line = SIGNALS[which]
    assert rc == code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == line


def assert_no_output(parent: Path, keep: tuple[str, ...] = ()) -> None:
    """Nothing in ``parent`` but ``keep``: no output, no .NAME.tmp-*, no lock file."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


# -- a signal at each phase ----------------------------------------------------------------

@pytest.mark.parametrize("phase,which", [("loading", "SIGTERM"), ("calibration", "SIGHUP"),
                                         ("pruning", "SIGTERM"), ("writing", "SIGTERM"),
                                         ("writing", "SIGINT")])
def test_prune_signal_at_each_phase(phase, which, tiny_folder, code_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    child = Child(tmp_path, phase, prune_args(tiny_folder, code_dir, runs / "out"))
    child.wait_ready()
    if phase == "writing":
        assert any(p.name.startswith(".out.tmp-") for p in runs.iterdir())  # mid-write
    sent = time.monotonic()
    child.proc.send_signal(SIGNALS[which][0])
    rc, _, err = child.finish()
    assert time.monotonic() - sent < 10
    assert_signalled(rc, err, which)
    assert_no_output(runs)
    child.assert_clean()


def test_eval_signal_while_generating(tiny_folder, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    argv = ["eval", "--model", str(tiny_folder), "--humaneval", "--limit", "2", "--max-new-tokens", "4",
            "--seq-len", "128", "--no-efficiency", "--out", str(runs / "ev")]
    child = Child(tmp_path, "generating", argv)
    child.wait_ready()
    child.proc.send_signal(signal.SIGTERM)
    rc, _, err = child.finish()
    assert_signalled(rc, err, "SIGTERM")
    assert_no_output(runs)
    child.assert_clean()


def sleeping_eval(tmp_path: Path, out: Path) -> list[str]:
    """eval argv scoring 4 completions that each sleep for a minute, 2 at a time."""
    samples = tmp_path / "samples.jsonl"
    sleeper = "    import time\n    time.sleep(60)\n"
    samples.write_text("".join(json.dumps({"task_id": f"HumanEval/{i}", "completion": sleeper}) + "\n"
                               for i in range(4)))
    return ["eval", "--humaneval", "--completions", str(samples), "--limit", "4", "--timeout", "60",
            "--workers", "2", "--out", str(out)]


@pytest.mark.parametrize("which", ["SIGTERM", "SIGINT"])
def test_eval_signal_while_programs_run(which, tmp_path):
    """An interrupt stops running sandboxed programs at once (they would sleep for a minute)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    child = Child(tmp_path, "programs", sleeping_eval(tmp_path, runs / "ev"))
    child.wait_for_programs()
    sent = time.monotonic()
    child.proc.send_signal(SIGNALS[which][0])
    rc, _, err = child.finish()
    assert time.monotonic() - sent < 5, "the interrupt waited for the running programs"
    assert_signalled(rc, err, which)
    assert_no_output(runs)
    time.sleep(0.5)  # the runners' last clean-up after their parent is gone
    child.assert_clean()


# -- SIGKILL and two writers ---------------------------------------------------------------

def _sentinel_output(runs: Path) -> Path:
    out = runs / "out"
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("the previous result\n")
    return out


def test_sigkill_while_writing_keeps_the_previous_output(tiny_folder, code_dir, tmp_path):
    from codeprune.outputs import check_output, release

    out = _sentinel_output(tmp_path / "runs")
    child = Child(tmp_path, "writing", prune_args(tiny_folder, code_dir, out, "--overwrite"))
    child.wait_ready()
    child.proc.kill()
    child.finish()
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]  # untouched
    stale = [p.name for p in out.parent.iterdir() if p.name != "out"]
    assert any(n.startswith(".out.tmp-") for n in stale), stale  # SIGKILL cannot clean up...
    check_output(out, True)  # ...the next run's check removes what the dead process left
    release(out)
    assert_no_output(out.parent, keep=("out",))


def test_sigkill_while_programs_run(tmp_path):
    """codeprune killed outright: its runners stop their programs (parent-death signal) and the
    next sandbox use removes any folder the dead process left."""
    from codeprune.outputs import check_output, release, remove_stale

    runs = tmp_path / "runs"
    runs.mkdir()
    child = Child(tmp_path, "programs", sleeping_eval(tmp_path, runs / "ev"))
    child.wait_for_programs()
    child.proc.kill()
    child.finish()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not [p for p, start in child.seen if start is not None and start_time(p) == start]:
            break
        time.sleep(0.1)
    for prefix in ("codeprune-sandbox-log-", "codeprune-sandbox-"):
        remove_stale(child.tmpdir, prefix)
    child.assert_clean()
    check_output(runs / "ev", False)  # the next run's check removes the dead run's lock file
    release(runs / "ev")
    assert_no_output(runs)


def test_two_prunes_to_the_same_output(tiny_folder, code_dir, tmp_path):
    """The second fails at once (exit 2, one line); the first finishes and its result is whole."""
    runs = tmp_path / "runs"
    runs.mkdir()
    go = tmp_path / "go"
    first = Child(tmp_path, "calibration", prune_args(tiny_folder, code_dir, runs / "out"), go=go)
    first.wait_ready()
    second = run(prune_args(tiny_folder, code_dir, runs / "out"))
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"codeprune: error: another codeprune process (pid {first.proc.pid}) is writing {runs / 'out'}"]
    go.write_text("go")
    rc, _, err = first.finish(timeout=120)
    assert rc == 0, err[-2000:]
    assert_no_output(runs, keep=("out",))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "out")
    assert json.loads((runs / "out" / "report.json").read_text())["method"] == "wanda"
    assert model.config.num_hidden_layers == 2


# -- outputs checked before any work -------------------------------------------------------

def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("codeprune: error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 20 MiB tmpfs (root only): a real full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (tests/test_outputs.py injects the write faults)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_space_is_refused_before_loading(tiny_folder, code_dir, small_disk):
    (small_disk / "ballast").write_bytes(b"\0" * (8 * 2**20))
    start = time.monotonic()
    line = one_line(run(prune_args(tiny_folder, code_dir, small_disk / "out")))
    assert "not enough space for" in line and "MiB free" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]
    assert time.monotonic() - start < 30


def test_full_disk_while_writing_is_one_line(tiny_folder, code_dir, small_disk):
    """eval's report has no size known before: the disk fills while writing."""
    (small_disk / "ballast").write_bytes(b"\0" * (20 * 2**20 - 4096))
    proc = run(["eval", "--model", str(tiny_folder), "--ppl", f"python:{code_dir}", "--windows", "2",
                "--seq-len", "32", "--no-efficiency", "--out", str(small_disk / "ev")])
    line = one_line(proc)
    assert "No space left on device" in line and "nothing was written" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]


@pytest.mark.parametrize("command", ["prune", "eval", "instructions"])
def test_output_under_a_file_is_refused_before_work(command, tiny_folder, code_dir, tmp_path):
    afile = tmp_path / "some-file.txt"
    afile.write_text("x")
    argv = {"prune": prune_args(tiny_folder, code_dir, afile / "out"),
            "eval": ["eval", "--model", str(tiny_folder), "--out", str(afile / "out")],
            "instructions": ["instructions", "--from", f"python:{code_dir}", "--out", str(afile / "i.jsonl")]}
    start = time.monotonic()
    line = one_line(run(argv[command]))
    assert f"{afile} is a file, not a folder" in line
    assert time.monotonic() - start < 30


def test_output_inside_the_input_model_is_refused(tiny_folder, code_dir):
    line = one_line(run(prune_args(tiny_folder, code_dir, tiny_folder / "pruned")))
    assert "inside or replace the input" in line


def test_read_only_output_is_refused(tiny_folder, code_dir, tmp_path):
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            line = one_line(run(prune_args(tiny_folder, code_dir, ro / "out")))
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        assert "read-only file system" in line
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        line = one_line(run(prune_args(tiny_folder, code_dir, ro / "out")))
        assert "not writable" in line
