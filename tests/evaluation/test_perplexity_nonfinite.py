"""Non-finite logits or perplexity end in a typed error naming the model, never a report with nan."""

from __future__ import annotations

import math

import pytest
import torch

from codeprune.cli import main
from codeprune.data.calibration import TokenWindows
from codeprune.errors import CorruptModelError
from codeprune.evaluation.perplexity import NonFiniteOutputError, perplexity, perplexity_remapped
from codeprune.models.checkpoint import save_checkpoint

from ..conftest import make_tiny


def _windows(ids) -> TokenWindows:
    return TokenWindows(input_ids=ids, source="python:code", split="heldout", n_documents=ids.shape[0])


def _poison(lm, value=float("nan")):
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight[0, 0] = value
    return lm


def test_finite_model_scores(tiny_llama, random_ids):
    assert math.isfinite(perplexity(tiny_llama, _windows(random_ids))["ppl"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_raises_naming_the_model(tiny_tokenizer, random_ids, value):
    lm = _poison(make_tiny("llama", tokenizer=tiny_tokenizer), value)
    with pytest.raises(NonFiniteOutputError) as e:
        perplexity(lm, _windows(random_ids), desc="ppl pruned")
    assert isinstance(e.value, CorruptModelError)
    assert str(e.value).startswith("model 'tiny-llama' gives non-finite logits (nan/inf) on 'python:code' "
                                   "(ppl pruned): its weights are corrupt or overflow in float32")
    with pytest.raises(NonFiniteOutputError, match="tiny-llama"):
        perplexity_remapped(lm, _windows(random_ids), lambda row: row.tolist())


def test_perplexity_beyond_float_range_raises(tiny_tokenizer, random_ids):
    lm = make_tiny("llama", tokenizer=tiny_tokenizer)
    with torch.no_grad():  # huge but finite logits: an NLL in the thousands, exp() overflows
        lm.model.lm_head.weight.mul_(1e6)
    with pytest.raises(NonFiniteOutputError, match="non-finite perplexity"):
        perplexity(lm, _windows(random_ids))


def test_evaluate_and_cli_refuse_a_nan_model(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    from codeprune.api import evaluate

    monkeypatch.setenv("CODEPRUNE_CACHE", str(tmp_path / "cache"))
    ckpt = save_checkpoint(_poison(make_tiny("llama", tokenizer=tiny_tokenizer)), tmp_path / "nan-model")
    code = tmp_path / "code"
    code.mkdir()
    for i in range(6):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    with pytest.raises(NonFiniteOutputError, match="nan-model"):
        evaluate(str(ckpt), ppl=[f"python:{code}"], seq_len=32, windows=4, efficiency=False)
    rc = main(["eval", "--model", str(ckpt), "--ppl", f"python:{code}", "--seq-len", "32", "--windows", "4",
               "--no-efficiency", "--out", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and "gives non-finite logits (nan/inf)" in err
    assert not (tmp_path / "report").exists()


def test_generation_stops_at_non_finite_logits(tiny_llama):
    """Greedy decoding of NaN logits would emit token 0 forever and score pass@1 = 0 with exit 0."""
    from codeprune.evaluation.humaneval import generate_texts

    with torch.no_grad():
        tiny_llama.model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    match = "tiny-llama' gives non-finite logits .* 'humaneval generate'"
    with pytest.raises(NonFiniteOutputError, match=match):
        generate_texts(tiny_llama, ["def f(x):\n"], max_new_tokens=3, desc="humaneval generate")
