"""The sandbox's own file system (issue 14, item 8): private size-limited /tmp, /var/tmp and
/dev/shm, a read-only minimal root, no Unix socket or file of the host within reach.

Skipped, with the reason, where the OS gives no mount namespace (neither root nor
unprivileged user namespaces). Every program runs for real (~0.1 s each).
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from codeprune.evaluation.sandbox import SandboxLimits, check_sandbox, run_program, run_programs

LIMITS = SandboxLimits(timeout=10, uid_base=1_980_000_000, tmpfs_mb=32)
HERE = Path(__file__).resolve().parent  # a folder outside /tmp (the checkout)


@pytest.fixture(scope="module", autouse=True)
def minimal_root() -> dict:
    prot = check_sandbox(LIMITS)["protections"]
    if not prot.get("minimal_root"):
        pytest.skip("no mount namespace here (neither root nor unprivileged user namespaces, or a "
                    "mount step was refused): programs see the host's file system")
    return prot


def run(source: str):
    res = run_program(textwrap.dedent(source), limits=LIMITS)
    assert res.protections.get("minimal_root"), res
    return res


def test_every_protection_holds_and_is_reported(minimal_root):
    assert minimal_root["mount"] and minimal_root["private_tmp"] and minimal_root["readonly_root"]
    res = run("print('hi')\n")
    assert res.status == "passed" and res.protections == minimal_root


@pytest.mark.parametrize("folder", [tempfile.gettempdir(), str(HERE)], ids=["host-tmp", "checkout"])
def test_unix_socket_files_outside_are_unreachable(folder):
    path = os.path.join(folder, f"codeprune-test-{secrets.token_hex(4)}.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        server.settimeout(0.2)
        try:
            res = run(f"""
                import socket
                s = socket.socket(socket.AF_UNIX)
                s.connect({path!r})
                s.sendall(b"escaped")
            """)
            with pytest.raises(TimeoutError):
                server.accept()
        finally:
            os.unlink(path)
    assert res.status == "error" and "FileNotFoundError" in res.detail, res


def _names(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def test_private_tmpfs_are_size_limited_and_vanish():
    token = secrets.token_hex(6)
    before = {d: _names(d) for d in ("/tmp", "/var/tmp", "/dev/shm")}
    res = run(f"""
        import os
        for d in ("/tmp", "/var/tmp"):
            with open(os.path.join(d, "probe-{token}"), "w") as f:
                f.write("left behind?")
        written = 0
        try:
            for i in range(9):  # 90 MB in 10 MB files (RLIMIT_FSIZE is 16 MB a file)
                with open(f"/dev/shm/probe-{token}-{{i}}", "wb") as f:
                    f.write(b"x" * (10 << 20))
                written += 10
        except OSError as e:
            print("refused", e.errno)
        print(written)
    """)
    assert res.status == "passed", res
    lines = res.stdout.split()
    assert lines[0] == "refused" and int(lines[-1]) <= LIMITS.tmpfs_mb, res.stdout
    for d, names in before.items():
        assert not [n for n in _names(d) - names if token in n], f"{d} kept the program's files"


def test_files_outside_the_minimal_root_are_unreadable(tmp_path):
    secret = secrets.token_hex(8)
    paths = []
    for folder in (tmp_path, HERE):
        p = Path(folder) / f"codeprune-test-{secret}.txt"
        p.write_text(secret)
        p.chmod(0o644)
        paths.append(str(p))
    os.chmod(tmp_path, 0o755)
    try:
        res = run(f"""
            import os
            seen = []
            for p in {paths!r} + ["/etc/hostname", "/root/.bashrc"]:
                try:
                    with open(p) as f:
                        seen.append(f.read())
                except OSError:
                    pass
            assert not seen, seen
            assert not [p for p in ("/home", "/work", "/root/.bashrc") if os.path.exists(p)]
        """)
    finally:
        for p in paths:
            os.unlink(p)
    assert res.status == "passed", res


def test_root_is_read_only_and_the_working_folder_writable():
    res = run("""
        import os, sys
        for target in ("/usr/codeprune-probe", "/codeprune-probe", "/etc/codeprune-probe"):
            try:
                open(target, "w").close()
            except OSError:
                pass
            else:
                raise AssertionError(f"wrote {target}")
        with open("scratch.txt", "w") as f:
            f.write("mine")
        assert os.environ["HOME"] == os.getcwd() and sorted(os.listdir(".")) == ["program.py", "scratch.txt"]
        import json, subprocess  # the standard library works as usual
        assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\\n"
    """)
    assert res.status == "passed", res


def test_programs_do_not_see_each_other():
    token = secrets.token_hex(6)
    src = f"""
import os, time
mine = f"/tmp/probe-{token}-{{os.getpid()}}"
open(mine, "w").close()
time.sleep(0.5)
assert [n for n in os.listdir("/tmp") if n.startswith("probe-{token}")] == [os.path.basename(mine)]
"""
    results = run_programs([src] * 4, limits=LIMITS, workers=4)
    assert all(r.status == "passed" for r in results), results


def test_a_refused_step_falls_back_to_the_host_and_says_so(monkeypatch):
    from codeprune.evaluation import sandbox

    real_job = sandbox._job

    def job_with_a_missing_prefix(*args):
        job = real_job(*args)
        job["prefixes"] = job["prefixes"] + ["/nonexistent/codeprune-prefix"]  # its bind mount fails
        return job

    monkeypatch.setattr(sandbox, "_job", job_with_a_missing_prefix)
    res = run_program("import os\nprint(os.getcwd())\nassert os.path.isdir('/proc/1')\n", limits=LIMITS)
    assert res.status == "passed", res
    assert res.protections["mount"] and not res.protections["minimal_root"]
    assert not res.protections["private_tmp"] and not res.protections["readonly_root"]
    assert "nonexistent" in res.extra["mount_error"] or "No such file" in res.extra["mount_error"]
    assert res.stdout.strip().startswith(tempfile.gettempdir())  # the host's working folder, as before


def test_the_report_says_which_protections_held(minimal_root):
    from types import SimpleNamespace

    from codeprune.reporting.markdown import _humaneval_lines

    he = SimpleNamespace(config={"completions": "x.jsonl"}, pass_at_k={"pass@1": 1.0}, n_problems=1,
                         statuses={"passed": 1, "failed": 0, "timeout": 0, "error": 0},
                         sandbox={**check_sandbox(LIMITS)})
    line = "\n".join(_humaneval_lines(he))
    assert "minimal root" in line and "private /tmp, /var/tmp, /dev/shm" in line and "read-only root" in line
    he.sandbox = {**he.sandbox, "protections": {**minimal_root, "minimal_root": False}}
    assert "host file system visible" in "\n".join(_humaneval_lines(he))
