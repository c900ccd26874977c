"""Checkpoints: plain from_pretrained reload with identical logits; atomic writes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codeprune.errors import OutputExistsError
from codeprune.methods import make_pruner
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.checkpoint import save_checkpoint


def test_pruned_checkpoint_reloads_with_identical_logits(tiny_any, random_ids, tmp_path):
    lm = tiny_any
    prune_model_(lm, make_pruner("wanda", pattern="2:4"), random_ids)
    out = save_checkpoint(lm, tmp_path / "run", report={"method": "wanda"}, render=lambda r: "# r\n")
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
        raise OSError("disk full")

    monkeypatch.setattr(tiny_llama.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError):
        save_checkpoint(tiny_llama, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
