"""outputs.py: checks before work, atomic installs, write faults, owner-tagged temporary folders."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codeprune import outputs
from codeprune.errors import OutputExistsError, OutputWriteError
from codeprune.outputs import (
    check_output,
    claims,
    owner_alive,
    process_tag,
    release,
    remove_stale,
    scratch_dir,
    write_atomically,
    write_file_atomically,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_new_output_is_readable_and_alone(tmp_path):
    out = write_atomically(tmp_path / "run", False, lambda t: (t / "a.json").write_text("{}"))
    assert names(tmp_path) == ["run"]  # no .run.tmp-*, no lock file
    assert (out / "a.json").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755


def test_overwrite_swaps_in_one_step(tmp_path):
    out = tmp_path / "run"
    write_atomically(out, False, lambda t: (t / "v").write_text("1"))
    write_atomically(out, True, lambda t: (t / "v").write_text("2"))
    assert (out / "v").read_text() == "2" and names(tmp_path) == ["run"]


def test_a_writer_that_got_there_first_wins_whole(tmp_path):
    """Two runs passed their checks; the second to finish fails and leaves the first's folder."""
    out = tmp_path / "run"

    def fill(tmp: Path) -> None:
        (tmp / "mine").write_text("late")
        out.mkdir()  # another process renamed its finished folder into place meanwhile
        (out / "theirs").write_text("first")

    with pytest.raises(OutputExistsError, match="another process"):
        write_atomically(out, False, fill)
    assert names(out) == ["theirs"] and names(tmp_path) == ["run"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_write_errors_become_one_typed_error(tmp_path, code):
    def fill(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputWriteError, match=f"{re.escape(os.strerror(code))}; nothing was written"):
        write_atomically(tmp_path / "run", False, fill)
    assert names(tmp_path) == []
    with pytest.raises(OutputWriteError):
        write_file_atomically(tmp_path / "x.jsonl", False, lambda f: fill(tmp_path / "run2"))
    assert names(tmp_path) == []


def test_safetensors_full_disk_is_an_output_error(tmp_path):
    """A real ENOSPC from safetensors (it wraps it in its own exception type) on a small tmpfs."""
    import torch
    from safetensors.torch import save_file

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(OutputWriteError, match="nothing was written"):
            write_atomically(mnt / "run", False,
                             lambda t: save_file({"w": torch.zeros(1024, 1024)}, str(t / "w.safetensors")))
        assert names(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_file_output_rules(tmp_path):
    out = write_file_atomically(tmp_path / "d" / "x.jsonl", False, lambda f: f.write("{}\n"))
    assert out.read_text() == "{}\n" and out.stat().st_mode & 0o777 == 0o644
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        write_file_atomically(out, False, lambda f: f.write(""))
    with pytest.raises(OutputExistsError, match="is a folder"):
        check_output(tmp_path / "d", True, kind="file")
    assert names(tmp_path / "d") == ["x.jsonl"]


def test_checks_before_work(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OutputWriteError, match="is a file, not a folder"):
        check_output(tmp_path / "f.txt" / "deeper" / "out", False)
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(OutputWriteError, match="inside or replace the input"):
        check_output(model / "pruned", False, inputs=[model])
    with pytest.raises(OutputWriteError, match="inside or replace the input"):
        check_output(model, True, inputs=[model])
    with pytest.raises(OutputWriteError, match="not enough space"):
        check_output(tmp_path / "big", False, expected_bytes=2**60)
    assert check_output(tmp_path / "new" / "deeper" / "out", False) == tmp_path / "new" / "deeper" / "out"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_one_claim_per_output(tmp_path):
    """Another process cannot claim an output this one holds; the same process may, again."""
    out = tmp_path / "run"
    with claims():
        check_output(out, False)
        check_output(out, False)  # re-entrant
        code = f"from codeprune.outputs import check_output; check_output({str(out)!r}, False)"
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert f"another codeprune process (pid {os.getpid()}) is writing {out}" in probe.stderr
    assert names(tmp_path) == []  # the lock file went with the claim
    check_output(out, False)
    release(out)


def test_stale_temporary_folders_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_tag = f"{dead.pid}_{10**12}"  # a pid that is gone (or reused: another start time)
    (tmp_path / f"codeprune-sandbox-{dead_tag}-abc").mkdir()
    (tmp_path / f".run.tmp-{dead_tag}-x").mkdir()
    (tmp_path / f".run.tmp-{dead_tag}-x" / "model.safetensors").write_bytes(b"half")
    mine = scratch_dir("codeprune-sandbox-", tmp_path)
    (tmp_path / "codeprune-sandbox-notatag").mkdir()
    assert not owner_alive(dead_tag) and owner_alive(process_tag())
    removed = remove_stale(tmp_path, "codeprune-sandbox-")
    assert [p.name for p in removed] == [f"codeprune-sandbox-{dead_tag}-abc"]
    check_output(tmp_path / "run", False)  # the next write beside it sweeps its hidden siblings
    release(tmp_path / "run")
    assert names(tmp_path) == sorted(["codeprune-sandbox-notatag", mine.name])


def test_sigkill_between_renames_is_impossible_with_exchange(tmp_path, monkeypatch):
    """Without renameat2 the fallback still ends with the new folder in place."""
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    out = tmp_path / "run"
    write_atomically(out, False, lambda t: (t / "v").write_text("1"))
    write_atomically(out, True, lambda t: (t / "v").write_text("2"))
    assert (out / "v").read_text() == "2" and names(tmp_path) == ["run"]


def test_a_previous_output_moved_aside_by_a_dead_writer_is_put_back(tmp_path):
    """SIGKILL between install's two renames (file systems without renameat2): the next check
    restores the previous output instead of deleting it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = process_tag().rsplit("_", 1)[1]
    old = tmp_path / f".run.old-{dead.pid}_{10**12}_{host}-x"
    old.mkdir()
    (old / "v").write_text("previous")
    check_output(tmp_path / "run", True)
    release(tmp_path / "run")
    assert names(tmp_path) == ["run"] and (tmp_path / "run" / "v").read_text() == "previous"


def test_another_machines_tags_are_left_alone(tmp_path):
    pid, start, host = process_tag().split("_")
    other = "0123abcd" if host != "0123abcd" else "fedc9876"
    (tmp_path / f"codeprune-sandbox-999999_5_{other}-a").mkdir()  # a live process of another host
    (tmp_path / f"codeprune-sandbox-999999_5_{host}-a").mkdir()  # a dead one of ours
    assert owner_alive(f"999999_5_{other}") and not owner_alive(f"999999_5_{host}")
    remove_stale(tmp_path, "codeprune-sandbox-")
    assert names(tmp_path) == [f"codeprune-sandbox-999999_5_{other}-a"]


def test_home_and_current_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), str(tmp_path.parent), "~"):
        with pytest.raises(OutputWriteError, match="home folder or holds the current folder"):
            check_output(out, True)


def test_a_relative_claim_is_recognised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with claims():
        check_output("run", False)
        check_output("other", False)  # sweeps the folder: must not take this process's own lock
        assert (tmp_path / ".run.codeprune-lock").exists()
    assert names(tmp_path) == []
