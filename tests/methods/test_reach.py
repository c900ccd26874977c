"""The largest ratio a structured configuration can reach (methods/structured/search.py ``reach``),
refused before any work when exceeded; reachable ratios land within a point.

Tiny llama (tests/conftest.py TINY): hidden 64, 4 query heads of 16 in 2 KV groups, FFN 96,
2 layers. A layer: q 64x64, k and v 32x64, o 64x64 (12,288), gate/up/down 3x64x96 (18,432),
two norms (128): 30,848; the decoder 61,696. Qwen2 adds q/k/v biases (64 + 32 + 32): 30,976.
"""

from __future__ import annotations

import pytest
import torch

from codeprune.cli import main
from codeprune.errors import ConfigError
from codeprune.methods import make_pruner
from codeprune.methods.structured.plan import decoder_param_count
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.structured.search import check_reachable, floor3, reach

from ..conftest import make_tiny

LAYER, DECODER = 30_848, 61_696
QUERY_UNIT = 2 * 16 * 64 + 64 * 2 * 16  # one query head per KV group: its q rows and o columns
GROUP_UNIT = QUERY_UNIT + 2 * 16 * 64  # a KV group: its two query heads, its k and v rows
CHANNELS = 95 * 3 * 64  # all FFN channels but one


def flap(**kw):
    return make_pruner("flap", **{"ratio": 0.5, "compensation": False, **kw})


@pytest.mark.parametrize("options, removable", [
    ({}, 2 * (QUERY_UNIT + CHANNELS)),  # adaptive, query unit (auto under GQA)
    ({"head_unit": "group"}, 2 * (GROUP_UNIT + CHANNELS)),
    ({"units": "ffn"}, 2 * CHANNELS),
    ({"units": "heads"}, 2 * QUERY_UNIT),
    ({"scope": "0.5:1"}, QUERY_UNIT + CHANNELS),  # layer 0 stays whole
    ({"structure": "uniform"}, 2 * (QUERY_UNIT + CHANNELS)),  # 72% of a layer: under the 95% guard
])
def test_reach_by_hand(options, removable):
    lm = make_tiny("llama")
    assert decoder_param_count(lm.adapter) == DECODER
    r = reach(lm, flap(**options).config)
    assert r.removable == removable and r.decoder == DECODER
    assert r.ratio == removable / DECODER


def test_reach_uniform_guard_and_compensation_by_hand():
    lm = make_tiny("llama")
    ffn = reach(lm, flap(units="ffn", structure="uniform").config)  # 95% of the FFN weights at most
    assert ffn.removable == pytest.approx(0.95 * 2 * 3 * 64 * 96) and ffn.removable < 0.95 * 2 * 3 * 64 * 96
    assert "uniform structure" in ffn.why
    qwen = make_tiny("qwen2")
    assert decoder_param_count(qwen.adapter) == 2 * 30_976
    # query heads carry their q bias; the compensation adds o_proj and down_proj biases (64 each)
    removable = 2 * (QUERY_UNIT + 2 * 16 + CHANNELS - 2 * 64)
    assert reach(qwen, flap(compensation=True).config).removable == removable


def test_unreachable_ratio_is_refused_with_the_largest():
    lm = make_tiny("llama")
    best = 2 * (QUERY_UNIT + CHANNELS) / DECODER  # 0.724...
    with pytest.raises(ConfigError) as err:
        check_reachable(lm, flap(ratio=0.99))
    assert str(err.value) == (
        "ratio 0.99 cannot be reached by flap on tiny-llama: every layer keeps at least one query head "
        f"per KV group and one FFN channel, so at most {floor3(best):.3f} of the decoder-layer parameters "
        "can be removed")
    check_reachable(lm, flap(ratio=floor3(best)))  # the printed bound itself is accepted
    with pytest.raises(ConfigError, match="every layer in the scope 0.5:1 keeps .* outside it stay whole"):
        check_reachable(lm, flap(ratio=0.5, scope="0.5:1"))


@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
@pytest.mark.parametrize("compensation", [False, True])
def test_ratio_near_the_limit_lands_within_a_point(structure, compensation):
    """The README's promise at the edge: the largest accepted ratio is achieved within 1 point."""
    lm = make_tiny("llama", intermediate_size=256)
    cfg = dict(structure=structure, compensation=compensation)
    ratio = floor3(reach(lm, flap(**cfg).config).ratio)
    dense = decoder_param_count(lm.adapter)
    x = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    prune_structured_(lm, flap(ratio=ratio, **cfg), x)
    assert abs(1 - decoder_param_count(lm.adapter) / dense - ratio) < 0.01


def test_cli_refuses_before_calibration(monkeypatch, capsys, tmp_path, stdlib_dir):
    monkeypatch.setattr("codeprune.workflows.common.load_model",
                        lambda model, dtype="float32": make_tiny("llama"))

    def no_calibration(*a, **k):
        raise AssertionError("calibration windows were built")

    monkeypatch.setattr("codeprune.workflows.prune.calibration_windows", no_calibration)
    rc = main(["prune", "--model", "tiny", "--method", "flap", "--ratio", "0.99", "--calib",
               f"python:{stdlib_dir}", "--seq-len", "32", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    # flap compensates: Llama's bias flags give every kept q/k/v/o row (32 + 32 + 32 + 64) and
    # gate/up/down row (1 + 1 + 64) a bias, 226 a layer
    best = 2 * (QUERY_UNIT + CHANNELS - 226) / DECODER
    assert "ratio 0.99 cannot be reached by flap on tiny-llama" in err[0]
    assert f"at most {floor3(best):.3f} of the decoder-layer" in err[0] and floor3(best) == 0.716
    assert not (tmp_path / "out").exists()
