"""The verified cache: manifests, size checks on load, hashes on --verify and after a crash,
--rebuild, one entry from two concurrent builders, no leftovers (models/cache.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeprune.cli import main
from codeprune.errors import CorruptModelError, OutputWriteError
from codeprune.models import cache, offline
from codeprune.models.loading import load_model
from codeprune.models.offline import OFFLINE_MODELS

from .tiny_gguf import write_tiny_gguf

ALIAS = "tiny-cached"
DEAD = "999999999_1"  # a pid above any pid_max: its owner is gone


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def alias(gguf_file, monkeypatch) -> str:
    """An offline alias whose one 'package part' is the tiny GGUF file."""
    data = gguf_file.read_bytes()
    spec = dataclasses.replace(OFFLINE_MODELS["smollm2-135m"], alias=ALIAS, parts=(("x", "tiny.gguf"),),
                               size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(OFFLINE_MODELS, ALIAS, spec)
    monkeypatch.setattr(offline, "_locate", lambda *_: gguf_file)
    return ALIAS


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _corrupt_middle(path: Path, n: int = 256 * 1024) -> None:
    size = path.stat().st_size
    assert size > n
    with open(path, "r+b") as f:
        f.seek((size - n) // 2)
        f.write(b"\xff" * n)
    assert path.stat().st_size == size


def _simulate_crash(root: Path) -> Path:
    marker = root / f".active-{DEAD}-abcd1234"
    marker.touch()
    return marker


def _cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_build_writes_a_manifest_and_leaves_nothing_behind(alias, _private_cache):
    folder = offline.ensure_cached(alias)
    manifest = json.loads((folder / cache.MANIFEST).read_text())["files"]
    weights = _weights(folder)
    assert manifest["model.safetensors"] == {
        "size": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert set(manifest) == {p.name for p in folder.iterdir()} - {cache.MANIFEST}
    assert [p.name for p in (_private_cache / "models").iterdir()] == [alias]
    leftovers = [p.name for p in _private_cache.iterdir()
                 if not p.name.startswith((".lock-", ".active-")) and p.name != "models"]
    assert leftovers == []


def test_middle_corruption_found_by_verify_and_after_a_crash(alias, _private_cache, capsys):
    folder = offline.ensure_cached(alias)
    _corrupt_middle(_weights(folder))
    assert offline.ensure_cached(alias) == folder  # same size: the per-load check is stat only

    code, out, err = _cli(["models", "--verify"], capsys)
    assert code == 2 and err == []
    assert "smollm2-135m: not cached" in out
    line = next(x for x in out if x.startswith(f"{alias}:"))
    assert "corrupt (model.safetensors: sha256 differs" in line
    assert f"codeprune models --rebuild {alias}" in line
    code, out, _ = _cli(["models", "--verify", alias], capsys)
    assert code == 2 and len(out) == 1

    marker = _simulate_crash(_private_cache)
    with pytest.raises(CorruptModelError, match=f"cache of '{alias}' is corrupt .*--rebuild {alias}"):
        load_model(alias)
    assert not marker.exists()
    assert f"models/{alias}" in json.loads((_private_cache / cache.PENDING).read_text())


def test_truncated_file_names_the_alias_and_rebuild_fixes_it(alias, _private_cache, capsys):
    folder = offline.ensure_cached(alias)
    weights = _weights(folder)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CorruptModelError) as e:
        load_model(alias)
    assert str(e.value) == (f"cache of '{alias}' is corrupt (model.safetensors: size {size - 100} != "
                            f"{size}): run `codeprune models --rebuild {alias}`")
    code, out, _ = _cli(["models", "--rebuild", alias], capsys)
    assert code == 0 and out == [f"rebuilt {alias}: {folder}"]
    assert load_model(alias).model.config.model_type == "llama"
    assert _cli(["models", "--verify", alias], capsys)[:2] == (0, [f"{alias}: ok"])


def test_rebuild_keeps_the_old_entry_until_the_new_one_is_whole(alias, _private_cache, monkeypatch):
    folder = offline.ensure_cached(alias)
    before = _weights(folder).read_bytes()

    def fail(gguf, dest, info):
        (dest / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offline, "_dequantize_to_folder", fail)
    with pytest.raises(OutputWriteError, match="No space left on device; nothing was written"):
        offline.rebuild(alias)
    assert _weights(folder).read_bytes() == before
    assert offline.verify_entries([alias]) == [(alias, "ok")]
    assert [p.name for p in (_private_cache / "models").iterdir()] == [alias]


def test_stale_temporary_folders_are_removed(alias, _private_cache):
    stale_entry = _private_cache / "models" / f".{alias}.tmp-{DEAD}-x1"
    stale_parts = _private_cache / f".assemble-{DEAD}-x2"
    for p in (stale_entry, stale_parts):
        p.mkdir(parents=True)
        (p / "part").write_bytes(b"x")
    offline.ensure_cached(alias)
    assert not stale_entry.exists() and not stale_parts.exists()


def test_entry_without_manifest_is_adopted_or_refused(alias, _private_cache):
    folder = offline.ensure_cached(alias)
    (folder / cache.MANIFEST).unlink()
    offline.ensure_cached(alias)  # an older codeprune's entry: checked, then given a manifest
    assert (folder / cache.MANIFEST).is_file()
    (folder / cache.MANIFEST).unlink()
    _corrupt_middle(_weights(folder))  # 0xFF bytes read as NaN
    with pytest.raises(CorruptModelError, match="nan/inf.*--rebuild"):
        offline.ensure_cached(alias)


def test_gguf_file_entries_are_verified_and_rebuilt_by_path(gguf_file, _private_cache, capsys):
    folder = offline.gguf_cache(gguf_file)
    _corrupt_middle(_weights(folder))
    code, out, _ = _cli(["models", "--verify"], capsys)
    assert code == 2
    assert f"tiny.gguf: corrupt (model.safetensors: sha256 differs from the manifest): " \
           f"run `codeprune models --rebuild {gguf_file}`" in out
    assert _cli(["models", "--rebuild", str(gguf_file)], capsys)[0] == 0
    assert _cli(["models", "--verify", str(gguf_file)], capsys)[:2] == (0, ["tiny.gguf: ok"])


CHILD = """
import os, sys, time
from pathlib import Path
from codeprune.models import offline
real = offline._dequantize_to_folder
def logged(*a, **k):
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # keep the other process waiting on the lock
    return real(*a, **k)
offline._dequantize_to_folder = logged
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
print(offline.gguf_cache(Path(sys.argv[1])))
"""


def test_two_processes_build_one_entry(gguf_file, tmp_path, _private_cache):
    env = {**os.environ, "BUILD_LOG": str(tmp_path / "builds.log"), "TQDM_DISABLE": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(gguf_file), str(tmp_path / f"ready{i}"),
                               str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # the second found it built
    assert [p.name for p in (_private_cache / "gguf").iterdir()] == [Path(results[0][0].strip()).name]
    assert sorted(p.name for p in _private_cache.iterdir() if p.name.startswith(".")) == \
        sorted(p.name for p in _private_cache.glob(".lock-*"))  # no temp folders, no live markers
    assert offline.verify_entries([str(gguf_file)]) == [("tiny.gguf", "ok")]


@pytest.mark.slow
def test_real_alias_cache_has_a_manifest_and_verifies(_private_cache, capsys):
    spec = OFFLINE_MODELS["smollm2-135m"]
    if not offline.is_installed(spec):
        pytest.skip(f"smollm2-135m not installed: {spec.pip_command}")
    folder = offline.ensure_cached("smollm2-135m")
    assert (folder / cache.MANIFEST).is_file()
    _corrupt_middle(_weights(folder))
    code, out, _ = _cli(["models", "--verify", "smollm2-135m"], capsys)
    assert code == 2 and "smollm2-135m: corrupt (model.safetensors" in out[0]
