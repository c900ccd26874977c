"""Checkpoints: plain from_pretrained reload with identical logits; atomic writes; file modes;
the model card; the saved dtype."""

import json
import os
import stat
from functools import partial

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from codeprune.errors import ConfigError, OutputExistsError, OutputWriteError
from codeprune.methods import make_pruner
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.checkpoint import disk_bytes, resolve_save_dtype, save_checkpoint
from codeprune.reporting.model_card import render_model_card

from ..conftest import make_tiny


def test_pruned_checkpoint_reloads_with_identical_logits(tiny_any, random_ids, tmp_path):
    lm = tiny_any
    prune_model_(lm, make_pruner("wanda", pattern="2:4"), random_ids)
    out = save_checkpoint(lm, tmp_path / "run",
                          extra=lambda f: (f / "report.json").write_text(json.dumps({"method": "wanda"})))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp folder left
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "report.json").read_text()) == {"method": "wanda"}

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    with torch.no_grad():
        a = lm.model(input_ids=random_ids).logits
        b = reloaded(input_ids=random_ids).logits
    assert torch.equal(a, b)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("def f(): pass")["input_ids"] == lm.tokenizer("def f(): pass")["input_ids"]


def test_existing_output_is_refused_then_replaced(tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("sentinel")
    with pytest.raises(OutputExistsError):
        save_checkpoint(tiny_llama, out)
    assert (out / "keep.txt").read_text() == "sentinel"
    save_checkpoint(tiny_llama, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_llama.tokenizer, "save_pretrained", boom)
    with pytest.raises(OutputWriteError, match="No space left on device; nothing was written"):
        save_checkpoint(tiny_llama, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def _front_matter(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_checkpoint_files_are_readable_by_everyone(tiny_llama, random_ids, tmp_path):
    prune_model_(tiny_llama, make_pruner("wanda", sparsity=0.5), random_ids)

    def extra(folder):  # a sub-folder, as recover's adapter/
        (folder / "adapter").mkdir(mode=0o700)
        (folder / "adapter" / "w.safetensors").write_bytes(b"x")
        (folder / "adapter" / "w.safetensors").chmod(0o600)

    old = os.umask(0o077)  # the strictest umask: the modes below are set, not inherited
    try:
        out = save_checkpoint(tiny_llama, tmp_path / "run", extra=extra)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "adapter").stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "model.safetensors" in files and len(files) > 4
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


def test_model_card_front_matter_and_plain_reload(tiny_llama, random_ids, tmp_path):
    prune_model_(tiny_llama, make_pruner("wanda", pattern="2:4"), random_ids)
    report = {"kind": "prune", "model": "smollm2-135m", "method": "wanda", "pruning": "unstructured",
              "pattern": "2:4", "sparsity_target": 0.5, "sparsity_actual": 0.5, "params_dense": 1000,
              "params_total": 1000, "params_nonzero": 600, "ppl_dense": 10.0, "ppl_pruned": 12.5,
              "efficiency": {"disk_bytes": None},
              "source": {"kind": "alias", "name": "smollm2-135m", "model_type": "llama",
                         "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
              "provenance": {"command": "codeprune prune --model smollm2-135m --method wanda --pattern 2:4"},
              "notes": ["dequantized from a Q4_1 GGUF"]}
    out = save_checkpoint(tiny_llama, tmp_path / "run", card=partial(render_model_card, report),
                          extra=lambda f: report["efficiency"].update(disk_bytes=disk_bytes(f)))
    meta, body = _front_matter(out)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["pruned", "codeprune", "wanda", "llama"]
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert report["provenance"]["command"] in body and "2:4" in body and "10 -> 12.5" in body
    assert report["efficiency"]["disk_bytes"] > 0 and "MB" in body  # measured, then shown
    assert "float32 safetensors" in body and "trust_remote_code" not in body
    AutoModelForCausalLM.from_pretrained(out)  # the card does not disturb a plain load


def test_model_card_without_command_or_known_source():
    text = render_model_card({"kind": "prune", "model": "runs/x", "method": "flap", "pruning": "structured",
                              "structure": "heads+channels", "ratio_target": 0.2, "source": None},
                             needs_remote_code=True)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in meta and "license" not in meta
    assert meta["tags"] == ["pruned", "codeprune", "flap"]
    assert "Python API" in text and "trust_remote_code=True" in text and "codeprune.load" in text


def test_bfloat16_save_halves_the_weights_and_keeps_the_model(tiny_any, random_ids, tmp_path):
    lm = tiny_any
    full = save_checkpoint(lm, tmp_path / "fp32")
    half = save_checkpoint(lm, tmp_path / "bf16", save_dtype="bfloat16")
    assert lm.model.dtype == torch.float32  # the model in memory is not cast
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((full / "config.json").read_text())["dtype"] == "float32"
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    reloaded = AutoModelForCausalLM.from_pretrained(half).eval()
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        a = lm.model(input_ids=random_ids).logits
        b = reloaded.float()(input_ids=random_ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_tied_embeddings_stay_tied_when_cast(tiny_tokenizer, random_ids, tmp_path):
    lm = make_tiny("qwen2", tokenizer=tiny_tokenizer, tie_word_embeddings=True)
    out = save_checkpoint(lm, tmp_path / "run", save_dtype="float16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.float16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_default_save_dtype_is_the_sources_but_never_wider(tiny_llama, tmp_path):
    assert resolve_save_dtype(tiny_llama, None) == torch.float32  # the source's dtype is unknown
    tiny_llama.origin["dtype"] = "bfloat16"  # e.g. dequantized GGUF weights, loaded as float32
    assert resolve_save_dtype(tiny_llama, None) == torch.bfloat16
    assert resolve_save_dtype(tiny_llama, "float32") == torch.float32
    out = save_checkpoint(tiny_llama, tmp_path / "run")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tiny_llama.origin["dtype"] = "float32"
    tiny_llama.model.to(torch.float16)  # loaded with --dtype float16: widening adds no information
    assert resolve_save_dtype(tiny_llama, None) == torch.float16
    with pytest.raises(ConfigError, match="bfloat16"):
        resolve_save_dtype(tiny_llama, "int8")


@pytest.mark.slow
def test_smollm2_checkpoint_is_bfloat16_with_its_upstream_card(smollm2, tmp_path):
    report = {"kind": "prune", "model": "smollm2-135m", "method": "magnitude", "source": smollm2.origin}
    out = save_checkpoint(smollm2, tmp_path / "run", card=partial(render_model_card, report))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and not {"_name_or_path", "_model_name_or_path"} & set(config)
    assert (out / "model.safetensors").stat().st_size < 300e6  # float32 would be 538 MB
    meta, _ = _front_matter(out)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 563, 3158, 2012, 28, 30, 198]])
    with torch.no_grad():
        a = smollm2.model(input_ids=ids).logits
        b = reloaded.float()(input_ids=ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
