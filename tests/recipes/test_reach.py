"""A recipe target its stages cannot remove is refused before any work (recipes/runner.py
``check_reach``), with the largest target they can take.

Tiny llama (tests/conftest.py): 2 layers of 30,848 parameters, 99,264 in all (293 tokens,
untied embeddings of 64), so a token costs 128 parameters.
"""

from __future__ import annotations

import pytest
import torch

from codeprune.cli import main
from codeprune.errors import ConfigError
from codeprune.recipes.runner import RecipeState, _method_stage, check_reach
from codeprune.recipes.spec import Stage, load_recipe, parse_recipe

from ..conftest import make_tiny

LAYER, TOTAL = 30_848, 99_264


def recipe(*stages):
    return parse_recipe({"name": "t", "stages": list(stages)})


def test_shortgpt_target_beyond_the_layers_is_refused_with_the_largest():
    lm = make_tiny("llama")
    assert sum(p.numel() for p in lm.model.parameters()) == TOTAL
    # one layer of two can go: n = round(target * TOTAL / LAYER) must stay under 2, so the target
    # under 1.5 * LAYER / TOTAL = 0.46615: 0.466 is the largest (on the 0.0005 grid)
    with pytest.raises(ConfigError) as err:
        check_reach(lm, load_recipe("shortgpt"), 0.9)
    assert str(err.value) == (
        "target 0.9 cannot be reached by recipe shortgpt on tiny-llama: stage 1 (layers) would remove 3 "
        "of the 2 layers left, and keeps at least one; the largest target these stages can take is 0.466 "
        "(of all parameters)")
    check_reach(lm, load_recipe("shortgpt"), 0.466)
    with pytest.raises(ConfigError, match="the largest target these stages can take is 0.466"):
        check_reach(lm, load_recipe("shortgpt"), 0.467)


def test_flab_target_beyond_its_stages_counts_every_droppable_token():
    lm = make_tiny("llama")
    with pytest.raises(ConfigError) as err:
        check_reach(lm, load_recipe("flab"), 0.95)
    msg = str(err.value)
    assert msg.startswith("target 0.95 cannot be reached by recipe flab on tiny-llama: stage ")
    assert "all but 257 of 293, the special tokens and the byte alphabet" in msg
    best = float(msg.split("can take is ")[1].split(" ")[0])
    check_reach(lm, load_recipe("flab"), best)
    check_reach(lm, load_recipe("flab"), 0.22)


def test_fixed_stages_beyond_the_model():
    lm = make_tiny("llama")
    fixed = r"the fixed amounts of its stages cannot be reached by recipe t on tiny-llama: "
    with pytest.raises(ConfigError, match=fixed + r"stage 1 \(layers\) would remove 2 of the 2 layers"):
        check_reach(lm, recipe({"stage": "layers", "n": 2}), None)
    with pytest.raises(ConfigError, match=fixed + r"stage 2 \(ffn\) would remove 0.900 of the decoder-layer "
                       r"parameters left, and the uniform structure removes under 95% of the FFN channels: "
                       r"at most 0.567"):
        check_reach(lm, recipe({"stage": "layers", "n": 1}, {"stage": "ffn", "ratio": 0.9}), None)
    with pytest.raises(ConfigError, match="ratio 0.9 cannot be reached by flap on tiny-llama"):
        check_reach(lm, recipe({"stage": "flap", "ratio": 0.9}), None)
    check_reach(lm, recipe({"stage": "layers", "n": 1}, {"stage": "ffn", "ratio": 0.5}), None)


def test_budgeted_structured_stage_is_capped_at_its_reach():
    """Earlier stages may remove less than check_reach assumed: the stage then takes its most."""
    lm = make_tiny("llama")
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    state = RecipeState(ids, None, "text", "cpu", 4)
    record = _method_stage(lm, Stage("ffn", {"share": 1}), round(0.99 * 2 * LAYER), state)
    assert "over what the stage can remove" in record["capped"]
    # the uniform ffn stage stops under 95% of the FFN weights: 0.95 * 2 * 18,432 / 61,696 = 0.5676
    assert 0.557 < record["ratio_actual_decoder"] <= 0.567


def test_cli_recipe_target_refused_before_calibration(monkeypatch, capsys, tmp_path, stdlib_dir):
    monkeypatch.setattr("codeprune.workflows.common.load_model",
                        lambda model, dtype="float32": make_tiny("llama"))

    def no_calibration(*a, **k):
        raise AssertionError("calibration windows were built")

    monkeypatch.setattr("codeprune.workflows.prune.calibration_windows", no_calibration)
    rc = main(["prune", "--model", "tiny", "--recipe", "shortgpt", "--target", "0.9", "--calib",
               f"python:{stdlib_dir}", "--seq-len", "32", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "the largest target these stages can take is 0.466" in err[0]
    assert not (tmp_path / "out").exists()
