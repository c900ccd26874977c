"""Efficiency figures and the pass@k estimator."""

import warnings
from math import comb

import pytest
import torch
from torch import nn

from codeprune.errors import ConfigError
from codeprune.evaluation.efficiency import efficiency_report, macs_per_token
from codeprune.evaluation.passk import mean_pass_at_k, pass_at_k
from codeprune.methods import make_pruner
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.checkpoint import disk_bytes, save_checkpoint


def test_macs_match_the_linears_a_forward_runs(tiny_any):
    lm = tiny_any
    per_token = []
    hooks = [m.register_forward_hook(lambda mod, i, o: per_token.append(mod.in_features * mod.out_features))
             for m in lm.model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([[1, 2, 3]]))
    for h in hooks:
        h.remove()
    a = lm.adapter
    attention = a.num_layers * 2 * a.num_heads * a.head_dim * 10
    assert macs_per_token(lm, 10) == sum(per_token) + attention


def test_nonzero_macs_drop_by_the_pruned_weights(tiny_llama, random_ids):
    dense = macs_per_token(tiny_llama, 16)
    pruned = prune_model_(tiny_llama, make_pruner("wanda", pattern="2:4"), random_ids)
    removed = sum(int((lin.weight == 0).sum()) for lin in pruned)
    assert macs_per_token(tiny_llama, 16) == dense
    assert macs_per_token(tiny_llama, 16, nonzero=True) == dense - removed
    assert removed == sum(lin.weight.numel() for lin in pruned) // 2


def test_efficiency_report(tiny_llama, tmp_path):
    out = save_checkpoint(tiny_llama, tmp_path / "ckpt")
    r = efficiency_report(tiny_llama, checkpoint=out, batch_sizes=(1, 2), prompt_len=16, new_tokens=4)
    assert r["disk_bytes"] == disk_bytes(out) == sum(p.stat().st_size for p in out.iterdir())
    assert r["disk_bytes"] > r["bytes_in_memory"] == 4 * r["params_total"]
    for b in ("batch_1", "batch_2"):
        assert r["speed"][b]["prefill_tok_s"] > 0 and r["speed"][b]["decode_tok_s"] > 0
    assert r["peak_memory_mb"] > 0


def test_pass_at_k_hand_computed():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k wrong samples: some draw is right
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100))
    assert mean_pass_at_k([(2, 1), (2, 0)], 1) == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        pass_at_k(3, 1, 4)


def test_energy_estimate_through_codecarbon(monkeypatch, tmp_path):
    pytest.importorskip("codecarbon")  # the optional extra `energy` (make install installs it)
    from codeprune.evaluation.efficiency import energy_tracker

    monkeypatch.setenv("CODEPRUNE_ENERGY", "1")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated codecarbon options
        with energy_tracker() as energy:
            sum(i * i for i in range(200_000))
    assert list(tmp_path.iterdir()) == []  # no emissions.csv left in the working folder
    assert energy["estimate"] is True and "codecarbon" in energy["tool"]
    assert energy["kwh"] >= 0 and energy["co2_kg"] >= 0
    monkeypatch.setenv("CODEPRUNE_ENERGY", "0")
    with energy_tracker() as off:
        pass
    assert off == {}
