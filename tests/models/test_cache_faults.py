"""Faults of the verified cache (models/cache.py): a cache the user cannot write, other hosts'
crash markers, write faults and free space while building, the atomic manifest of an adopted
entry, stale .gguf entries in ``codeprune models --verify`` / ``--rebuild FOLDER``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest

from codeprune.errors import OutputWriteError
from codeprune.models import cache, offline

from .test_offline_cache import DEAD, _cli, _private_cache, alias, gguf_file  # noqa: F401 - fixtures


def _leftovers(root: Path) -> list[str]:
    """Everything under the cache root but lock files and this process's crash markers."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if not p.name.startswith((".lock-", ".active-")))


# --- a cache the user cannot write ------------------------------------------------------------

READ_ONLY_CHILD = """
import os, sys
from pathlib import Path
from codeprune.errors import CodepruneError
from codeprune.models import offline
if os.geteuid() == 0:  # imported first: the interpreter may live in root's home
    os.setgid(65534); os.setuid(65534)
print(offline.gguf_cache(Path(sys.argv[1])))
print(offline.gguf_cache(Path(sys.argv[1])))  # warned once only
try:
    offline.gguf_cache(Path(sys.argv[2]))
except CodepruneError as e:
    print(type(e).__name__, e)
"""


@pytest.fixture
def shared_dir():
    """A world-readable folder (pytest's own are private to their user)."""
    d = Path(tempfile.mkdtemp(prefix="codeprune-ro-test-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


def test_a_cache_the_user_cannot_write_still_loads(gguf_file, shared_dir, monkeypatch):  # noqa: F811
    root = shared_dir / "cache"
    monkeypatch.setenv("CODEPRUNE_CACHE", str(root))
    src, other = shared_dir / "tiny.gguf", shared_dir / "other.gguf"
    shutil.copy(gguf_file, src)
    shutil.copy(gguf_file, other)
    for p in (src, other):
        p.chmod(0o644)
    folder = offline.gguf_cache(src)  # built by its owner
    cache._drop_markers()
    for d in (root, root / "gguf"):
        d.chmod(0o555)  # ignored by root: the child then runs as nobody
    env = {**os.environ, "HOME": str(shared_dir), "HF_HOME": str(shared_dir / "hf"), "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", READ_ONLY_CHILD, str(src), str(other)], env=env,
                       capture_output=True, text=True, timeout=120, cwd=shared_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        str(folder), str(folder),
        f"OutputWriteError cannot build the cache of 'other.gguf': the model cache {root} cannot be "
        "written (Permission denied); set CODEPRUNE_CACHE to a folder you can write"]
    warnings = [x for x in r.stderr.splitlines() if x.startswith("codeprune:")]
    assert warnings == [f"codeprune: warning: the model cache {root} is read-only: crash detection off"]
    assert not list(root.glob(".active-*")) and [p.name for p in (root / "gguf").iterdir()] == [folder.name]


def test_an_existing_lock_file_is_opened_read_only(tmp_path, monkeypatch):
    lock = tmp_path / ".lock-x"
    lock.touch()
    lock.chmod(0o444)
    flags = []
    real = os.open
    monkeypatch.setattr(cache.os, "open", lambda p, f, *a: flags.append(f) or real(p, f, *a))
    with cache._flock(lock):
        pass
    assert flags == [os.O_RDONLY]


def test_unwritable_marker_means_read_only_mode(alias, _private_cache, monkeypatch, capsys):  # noqa: F811
    folder = offline.ensure_cached(alias)
    cache._drop_markers()

    def denied(*_):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache, "scratch_file", denied)
    monkeypatch.setattr(cache, "_open_lock", lambda _: None)
    (_private_cache / cache.PENDING).write_text(json.dumps([f"models/{alias}"]))
    assert offline.ensure_cached(alias) == folder  # pending: hashed, but the list cannot change
    assert offline.ensure_cached(alias) == folder
    assert capsys.readouterr().err.count("read-only: crash detection off") == 1
    assert json.loads((_private_cache / cache.PENDING).read_text()) == [f"models/{alias}"]
    with pytest.raises(OutputWriteError, match=f"model cache {_private_cache} cannot be written"):
        offline.rebuild(alias)


# --- owner tags: other hosts' markers are theirs ----------------------------------------------

def test_another_hosts_marker_is_left_alone(alias, _private_cache):  # noqa: F811
    _private_cache.mkdir()
    theirs = _private_cache / f".active-{DEAD}_00000000-abcd1234"  # a dead pid, on another host
    theirs.touch()
    offline.ensure_cached(alias)
    offline.ensure_cached(alias)
    assert theirs.exists() and not (_private_cache / cache.PENDING).exists()


# --- write faults and free space while building ------------------------------------------------

class SafetensorError(Exception):  # the name safetensors' own error has
    pass


@pytest.mark.parametrize("fault", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path '
                    '"/cache/models/.tiny-cached.tmp-1_2_3-x/.tmpAB12"'),  # as safetensors 0.4+ words it
])
def test_a_write_fault_while_building_is_one_error(alias, _private_cache, monkeypatch, fault):  # noqa: F811
    from transformers import PreTrainedModel

    def save(self, dest, *a, **k):
        (Path(dest) / "model.safetensors").write_bytes(b"half")
        raise fault

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    with pytest.raises(OutputWriteError) as e:
        offline.ensure_cached(alias)
    assert str(e.value) == (f"cannot build the cache of '{alias}' in {_private_cache / 'models'}: "
                            "No space left on device; nothing was written")
    assert _leftovers(_private_cache) == ["models"]


def test_not_enough_space_is_refused_before_building(alias, gguf_file, _private_cache, monkeypatch):  # noqa: F811
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 40, 1 << 40, 10 << 20))
    size = offline.OFFLINE_MODELS[alias].size
    with pytest.raises(OutputWriteError, match=rf"not enough space for the cache of '{alias}': about "
                       rf"{4 * size / 2**20:,.0f} MiB needed, 10 MiB free in .*models; free some"):
        offline.ensure_cached(alias)
    with pytest.raises(OutputWriteError, match="not enough space for the cache of 'tiny.gguf'"):
        offline.gguf_cache(gguf_file)  # its tensors' float32 size
    assert _leftovers(_private_cache) == ["gguf", "models"]


# --- the manifest of an adopted entry ----------------------------------------------------------

def test_adopting_writes_the_manifest_atomically(alias, _private_cache, monkeypatch):  # noqa: F811
    folder = offline.ensure_cached(alias)
    manifest = folder / cache.MANIFEST
    manifest.unlink()
    stale = folder / f".{cache.MANIFEST}.tmp-{DEAD}-x1"
    stale.write_text("{")
    real = json.dump

    def half(obj, f, **k):
        f.write('{"version": 1, "fi')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.json, "dump", half)
    assert offline.ensure_cached(alias) == folder  # it checked out; the manifest could not be written
    assert not manifest.exists() and not list(folder.glob(".*"))
    monkeypatch.setattr(cache.json, "dump", real)
    offline.ensure_cached(alias)
    files = json.loads(manifest.read_text())["files"]
    assert set(files) == {p.name for p in folder.iterdir()} - {manifest.name}


# --- stale .gguf entries ------------------------------------------------------------------------

def test_stale_gguf_entries_are_reported_and_rebuilt_by_folder(gguf_file, tmp_path, _private_cache,  # noqa: F811
                                                               capsys):
    src = tmp_path / "moved.gguf"
    shutil.copy(gguf_file, src)
    old = offline.gguf_cache(src)
    os.utime(src, ns=(1, 1))  # changed since: its key differs
    code, out, _ = _cli(["models", "--verify"], capsys)
    assert code == 0
    assert f"moved.gguf: stale (its .gguf is gone or changed): remove {old} or run " \
           f"`codeprune models --rebuild {src}`" in out
    code, out, _ = _cli(["models", "--rebuild", str(old)], capsys)
    new = offline.gguf_entry(src).folder
    assert code == 0 and out == [f"rebuilt {old}: {new}"]
    assert not old.exists() and [p.name for p in (_private_cache / "gguf").iterdir()] == [new.name]
    assert _cli(["models", "--verify", str(new)], capsys)[:2] == (0, ["moved.gguf: ok"])

    src.unlink()  # gone
    code, out, _ = _cli(["models", "--verify"], capsys)
    assert code == 0 and f"moved.gguf: stale (its .gguf is gone or changed): remove {new}" in out
    code, _, err = _cli(["models", "--rebuild", str(new)], capsys)
    assert code == 2 and len(err) == 1 and "is gone; remove the folder" in err[0]


def test_a_cache_root_that_is_a_file_is_one_error(alias, _private_cache):  # noqa: F811
    _private_cache.write_text("not a folder")
    with pytest.raises(OutputWriteError, match=rf"cannot build the cache of '{alias}': the model cache "
                       rf"{_private_cache} cannot be written \(File exists\); set CODEPRUNE_CACHE"):
        offline.ensure_cached(alias)
