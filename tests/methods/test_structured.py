"""Structured pruning: the plan, surgery, GQA, FLAP / baselines, compensation, export."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import codeprune
from codeprune.calibration.stats import ChannelStats
from codeprune.cli import main
from codeprune.errors import ConfigError
from codeprune.methods import make_pruner
from codeprune.methods.structured.flap import fluctuation
from codeprune.methods.structured.plan import LayerPlan, StructurePlan, decoder_param_count
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.structured.surgery import apply_plan_
from codeprune.methods.structured.units import attention_units
from codeprune.models.checkpoint import MODELING_FILE, save_checkpoint
from codeprune.models.counting import count_parameters

from ..conftest import ARCHS, make_tiny

GQA = dict(num_attention_heads=8, num_key_value_heads=2)  # 4 query heads per KV head, head_dim 8


def ids(n=8, length=32, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(lm, x):
    with torch.no_grad():
        return lm.model(input_ids=x).logits


def hand_plan(lm, with_bias=True) -> StructurePlan:
    """Layer 0: drop KV group 0 (heads 0-3) and channels 0-9; layer 1: one query head per
    group (heads 1 and 6) and every other channel; random compensation biases."""
    a = lm.adapter
    plan = StructurePlan.dense(a)
    g = torch.Generator().manual_seed(3)
    plan.layers[0] = LayerPlan(kv_heads=[1], q_heads=[4, 5, 6, 7], channels=list(range(10, 96)))
    plan.layers[1] = LayerPlan(kv_heads=[0, 1], q_heads=[0, 2, 3, 4, 5, 7], channels=list(range(0, 96, 2)))
    if with_bias:
        plan.layers[0].o_bias = torch.randn(64, generator=g)
        plan.layers[1].down_bias = torch.randn(64, generator=g)
    return plan


# -- the plan and surgery ------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_plan_parameter_count_equals_the_model_after_surgery(model_type):
    lm = make_tiny(model_type, **GQA)
    plan = hand_plan(lm)
    predicted = plan.param_count(lm)  # before any weight is touched
    apply_plan_(lm, plan)
    assert predicted == {"total": count_parameters(lm.model)[0], "decoder": decoder_param_count(lm.adapter)}
    assert logits(lm, ids()).shape[-1] == lm.adapter.vocab_size


def test_surgery_keeps_exactly_the_planned_rows_and_columns():
    lm = make_tiny("llama", **GQA)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    apply_plan_(lm, hand_plan(lm, with_bias=False))
    hd = 8
    attn, mlp = lm.model.model.layers[1].self_attn, lm.model.model.layers[1].mlp
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in [0, 2, 3, 4, 5, 7]])
    assert torch.equal(attn.q_proj.weight, dense["model.layers.1.self_attn.q_proj.weight"][q_rows])
    assert torch.equal(attn.o_proj.weight, dense["model.layers.1.self_attn.o_proj.weight"][:, q_rows])
    assert torch.equal(attn.k_proj.weight, dense["model.layers.1.self_attn.k_proj.weight"])
    ch = torch.arange(0, 96, 2)
    assert torch.equal(mlp.up_proj.weight, dense["model.layers.1.mlp.up_proj.weight"][ch])
    assert torch.equal(mlp.down_proj.weight, dense["model.layers.1.mlp.down_proj.weight"][:, ch])
    k0 = lm.model.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(k0, dense["model.layers.0.self_attn.k_proj.weight"][8:16])  # KV head 1 only
    assert lm.model.model.layers[1].self_attn.num_key_value_groups == 3
    assert lm.model.model.layers[0].self_attn.num_key_value_groups == 4


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_removing_structures_equals_zeroing_their_weights(model_type):
    """Cutting query heads and FFN channels must compute exactly what the dense model
    computes with those heads' o_proj columns and those channels' down_proj columns zeroed:
    this catches any mix-up of the GQA head-to-KV mapping or of row/column order."""
    lm = make_tiny(model_type, **GQA)
    masked = copy.deepcopy(lm)
    plan = StructurePlan.dense(lm.adapter)
    plan.layers[0] = LayerPlan(kv_heads=[0, 1], q_heads=[1, 2, 4, 7], channels=list(range(3, 96, 3)))
    plan.layers[1] = LayerPlan(kv_heads=[0, 1], q_heads=[0, 3, 5, 6], channels=list(range(50)))
    with torch.no_grad():
        for layer, lp in zip(masked.adapter.layers(), plan.layers, strict=True):
            lin = masked.adapter.linears(layer)
            for h in set(range(8)) - set(lp.q_heads):
                lin["o_proj"].weight[:, h * 8:(h + 1) * 8] = 0
            for c in set(range(96)) - set(lp.channels):
                lin["down_proj"].weight[:, c] = 0
    apply_plan_(lm, plan)
    x = ids()
    torch.testing.assert_close(logits(lm, x), logits(masked, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(kv_heads=[0, 1], q_heads=[0, 1, 2, 4], channels=[0]), "same number"),
    (dict(kv_heads=[1], q_heads=[0, 4, 5, 6], channels=[0]), "without its KV head"),
    (dict(kv_heads=[0, 1], q_heads=list(range(8)), channels=[]), "at least one"),
    (dict(kv_heads=[], q_heads=[], channels=[0]), "at least one"),
    (dict(kv_heads=[0, 1], q_heads=list(range(8)), channels=[500]), "channel"),
])
def test_invalid_plans_are_refused(bad, message):
    lm = make_tiny("qwen2", **GQA)
    plan = StructurePlan.dense(lm.adapter)
    plan.layers[1] = LayerPlan(**bad)
    with pytest.raises(ConfigError, match=message):
        apply_plan_(lm, plan)


# -- units and scores ---------------------------------------------------------------------


def test_query_units_take_one_head_from_every_group_weakest_first():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0, 9.0, 4.0, 8.0])  # 2 groups of 4
    units = attention_units(scores, n_kv=2, n_rep=4, kind="query")
    assert [u[1] for u in units] == [[3, 4], [1, 6], [2, 7], [0, 5]]
    assert all(u[2] == [] for u in units)  # KV heads stay
    groups = attention_units(scores, n_kv=2, n_rep=4, kind="group")
    assert [(u[1], u[2]) for u in groups] == [([0, 1, 2, 3], [0]), ([4, 5, 6, 7], [1])]


def test_fluctuation_metrics_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 6, generator=g) * torch.arange(1, 7) + torch.arange(6)
    W = torch.randn(4, 6, generator=g)
    st = ChannelStats(moments=True)
    for chunk in X.split(128):
        st.add_batch(chunk)
    var = X.double().var(0, unbiased=False)
    torch.testing.assert_close(fluctuation("ifv", W, st), var.float())
    torch.testing.assert_close(fluctuation("wifv", W, st), (var * W.double().square().sum(0)).float())
    wifn = W.abs().mean(0) * X.square().mean(0).sqrt()
    torch.testing.assert_close(fluctuation("wifn", W, st), wifn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("structure", ["uniform", "adaptive"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_achieved_ratio_is_within_one_point(model_type, structure, ratio):
    lm = make_tiny(model_type, **GQA, intermediate_size=256)
    before = decoder_param_count(lm.adapter)
    plan = prune_structured_(lm, make_pruner("flap", ratio=ratio, structure=structure), ids())
    actual = 1 - decoder_param_count(lm.adapter) / before
    assert abs(actual - ratio) < 0.01, actual
    heads, kv = plan.heads_per_layer, plan.kv_heads_per_layer
    assert all(h % k == 0 and h >= 1 for h, k in zip(heads, kv, strict=True))
    assert logits(lm, ids()).isfinite().all()


def test_gqa_group_unit_removes_kv_heads_with_their_query_heads():
    lm = make_tiny("qwen2", **GQA, num_hidden_layers=3, intermediate_size=256)
    pruner = make_pruner("flap", ratio=0.3, head_unit="group", structure="uniform")
    plan = prune_structured_(lm, pruner, ids())
    assert plan.kv_heads_per_layer == [1, 1, 1]  # round(0.3 * 2 groups) = 1 group per layer
    for layer, lp, h, kv in zip(lm.adapter.layers(), plan.layers, plan.heads_per_layer,
                                plan.kv_heads_per_layer, strict=True):
        assert h == 4 * kv  # whole groups only: the GQA ratio is unchanged
        assert {q // 4 for q in lp.q_heads} == set(lp.kv_heads)
        assert layer.self_attn.k_proj.out_features == kv * 8
    out = lm.model.generate(ids(1, 6), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_query_unit_keeps_kv_heads_and_equal_groups():
    lm = make_tiny("qwen2", **GQA, num_hidden_layers=3, intermediate_size=256)
    plan = prune_structured_(lm, make_pruner("flap", ratio=0.3, structure="uniform"), ids())
    assert plan.kv_heads_per_layer == [2, 2, 2]
    assert min(plan.heads_per_layer) < 8
    for lp in plan.layers:
        per_group = [sum(q // 4 == g for q in lp.q_heads) for g in lp.kv_heads]
        assert len(set(per_group)) == 1


def test_query_unit_needs_gqa():
    lm = make_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ConfigError, match="group"):
        prune_structured_(lm, make_pruner("flap", ratio=0.2, head_unit="query"), ids())


def test_bias_compensation_brings_layer_outputs_closer_to_dense():
    """Same selection (adaptive scores come from the dense model), with and without the
    bias: the sum over layers of the MSE between the pruned and dense layer outputs, each
    layer fed the dense model's inputs on the calibration windows, is smaller with it."""
    dense = make_tiny("llama", **GQA, num_hidden_layers=3, intermediate_size=256, seed=4)
    x = ids(16, 32, seed=5)
    with torch.no_grad():
        hidden = dense.model(input_ids=x, output_hidden_states=True).hidden_states

    def layer_mse(lm) -> float:
        total = 0.0
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        emb = dense.model.model.rotary_emb(hidden[0], pos)
        with torch.no_grad():
            for i, (d, p) in enumerate(zip(dense.adapter.layers(), lm.adapter.layers(), strict=True)):
                mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
                ref = d(hidden[i], attention_mask=mask, position_embeddings=emb)
                got = p(hidden[i], attention_mask=mask, position_embeddings=emb)
                ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
                total += float((ref - got).square().mean())
        return total

    with_bias = copy.deepcopy(dense)
    plan = prune_structured_(with_bias, make_pruner("flap", ratio=0.3, structure="adaptive"), x)
    assert all(lp.o_bias is not None and lp.down_bias is not None for lp in plan.layers)
    without = copy.deepcopy(dense)  # the same heads and channels, no bias
    bare = [LayerPlan(lp.kv_heads, lp.q_heads, lp.channels) for lp in plan.layers]
    apply_plan_(without, StructurePlan(bare, plan.head_dim, plan.n_rep))
    assert layer_mse(with_bias) < layer_mse(without)


def test_magnitude_sp_needs_no_data():
    lm = make_tiny("llama", **GQA, intermediate_size=256)
    plan = prune_structured_(lm, make_pruner("magnitude-sp", ratio=0.2), None)
    assert plan.ffn_per_layer[0] < 256
    with pytest.raises(ConfigError, match="calibration"):
        prune_structured_(make_tiny("llama", **GQA), make_pruner("wanda-sp", ratio=0.2), None)


# -- export ------------------------------------------------------------------------------


def test_uniform_llama_with_compensation_is_a_plain_checkpoint(tmp_path):
    lm = make_tiny("llama", intermediate_size=256)  # 4 heads / 2 KV: uniform keeps 2 (64 % 2 == 0)
    x = ids()
    plan = prune_structured_(lm, make_pruner("flap", ratio=0.4, structure="uniform"), x)
    assert plan.is_uniform and plan.heads_per_layer == [2, 2]
    out = save_checkpoint(lm, tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and "auto_map" not in config
    assert config["num_attention_heads"] == 2 and config["attention_bias"] and config["mlp_bias"]
    assert not (out / MODELING_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert torch.equal(logits(lm, x), plain(input_ids=x).logits.detach())
    a = plain.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
    b = lm.model.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_adaptive_checkpoint_reloads_through_its_modeling_file(model_type, tmp_path):
    lm = make_tiny(model_type, **GQA, num_hidden_layers=3, intermediate_size=256)
    x = ids()
    plan = prune_structured_(lm, make_pruner("flap", ratio=0.3), x)
    assert not plan.is_uniform
    out = save_checkpoint(lm, tmp_path / "a")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert len(config["per_layer_config"]) >= 1 and (out / MODELING_FILE).is_file()
    expected = logits(lm, x)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(remote(input_ids=x).logits.detach(), expected)
    ours = codeprune.load(str(out))
    assert torch.equal(logits(ours, x), expected)
    assert ours.adapter.layer_sizes(ours.adapter.layers()[0])["intermediate"] == plan.ffn_per_layer[0]
    a = remote.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
    b = lm.model.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_qwen2_compensation_bias_goes_through_the_modeling_file(tmp_path):
    """Qwen2 has no config flag for an o_proj / down_proj bias: even a uniform plan needs
    the modeling file to keep the compensation."""
    lm = make_tiny("qwen2", intermediate_size=256)
    x = ids()
    prune_structured_(lm, make_pruner("flap", ratio=0.4, structure="uniform"), x)
    out = save_checkpoint(lm, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["codeprune_extra_bias"] == ["down_proj", "o_proj"] and "per_layer_config" not in config
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(remote(input_ids=x).logits.detach(), logits(lm, x))


def test_a_pruned_checkpoint_can_be_pruned_again(tmp_path):
    lm = make_tiny("llama", **GQA, num_hidden_layers=3, intermediate_size=256)
    prune_structured_(lm, make_pruner("flap", ratio=0.2), ids())
    out = save_checkpoint(lm, tmp_path / "a")
    again = codeprune.load(str(out))
    before = decoder_param_count(again.adapter)
    prune_structured_(again, make_pruner("flap", ratio=0.2), ids())
    assert abs(1 - decoder_param_count(again.adapter) / before - 0.2) < 0.01
    assert logits(again, ids()).isfinite().all()


# -- API and CLI ---------------------------------------------------------------------------


def test_prune_report_has_the_structured_fields(tmp_path, code_dir_factory):
    lm = make_tiny("llama", **GQA, intermediate_size=256)
    res = codeprune.prune(lm, "flap", ratio=0.25, calib=f"python:{code_dir_factory}", samples=4, seq_len=32,
                          eval_windows=2, out=tmp_path / "r")
    r = json.loads((res.out / "report.json").read_text())
    for key in ("ratio_target", "ratio_actual_decoder", "ratio_actual_total", "structure", "heads_per_layer",
                "ffn_per_layer", "tokens_per_s_dense", "tokens_per_s_pruned", "params_dense", "export"):
        assert key in r, key
    assert r["ratio_target"] == 0.25 and abs(r["ratio_actual_decoder"] - 0.25) < 0.01
    assert 0 < r["ratio_actual_total"] < r["ratio_actual_decoder"]  # embeddings are not pruned
    assert r["params_total"] == count_parameters(res.model.model)[0]
    assert r["tokens_per_s_dense"]["decode"] > 0 and r["tokens_per_s_pruned"]["decode"] > 0
    assert r["efficiency"]["disk_bytes"] > 0
    assert "## Structure" in (res.out / "report.md").read_text()


@pytest.mark.parametrize("argv, expected", [
    (["--method", "flap", "--ratio", "1.2"], "ratio"),
    (["--method", "flap", "--ratio", "0"], "ratio"),
    (["--method", "flap", "--sparsity", "0.5"], "--ratio"),
    (["--method", "wanda", "--ratio", "0.2"], "--sparsity"),
    (["--method", "wanda-sp", "--metric", "ifv"], "metric"),
    (["--method", "flap", "--structure", "global"], "structure"),
])
def test_cli_refuses_bad_structured_options(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("codeprune.workflows.common.load_model",
                        lambda *a, **k: pytest.fail("loaded before validating"))
    try:
        code = main(["prune", "--model", "smollm2-135m", *argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own usage errors (choices)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def code_dir_factory(tmp_path):
    root = tmp_path / "code"
    root.mkdir()
    for i in range(6):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60))
        (root / f"m{i}.py").write_text(body)
    return root


def test_cli_prunes_a_folder_with_flap(tmp_path, code_dir_factory, capsys):
    src = save_checkpoint(make_tiny("llama", **GQA, intermediate_size=256), tmp_path / "dense")
    out = tmp_path / "flap"
    code = main(["prune", "--model", str(src), "--method", "flap", "--ratio", "0.3", "--structure", "uniform",
                 "--no-compensation", "--head-unit", "group", "--calib", f"python:{code_dir_factory}",
                 "--samples", "4", "--seq-len", "32", "--eval-windows", "2", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["method_options"]["compensation"] is False and r["method_options"]["head_unit"] == "group"
    assert r["structure"] == "uniform" and len(set(r["heads_per_layer"])) == 1
    assert r["kv_heads_per_layer"] == [1, 1] and r["heads_per_layer"] == [4, 4]  # one whole KV group
    assert json.loads(capsys.readouterr().out)["ratio_target"] == 0.3


def test_vllm_backend_refuses_a_per_layer_checkpoint(tmp_path):
    lm = make_tiny("llama", **GQA, num_hidden_layers=3, intermediate_size=256)
    prune_structured_(lm, make_pruner("flap", ratio=0.3), ids())
    out = save_checkpoint(lm, tmp_path / "a")
    from codeprune.evaluation.humaneval import HumanEvalConfig

    with pytest.raises(ConfigError, match="vLLM"):
        codeprune.evaluate(str(out), humaneval=HumanEvalConfig(backend="vllm"), efficiency=False)


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "taylor"])
def test_ffn_only_uniform_keeps_every_head_and_one_width(method, tmp_path):
    lm = make_tiny("llama", **GQA, num_hidden_layers=3)
    dense = decoder_param_count(lm.adapter)
    x = ids()
    pruner = make_pruner(method, ratio=0.2, units="ffn", structure="uniform", scope="0:1")
    plan = prune_structured_(lm, pruner, x)
    assert plan.heads_per_layer == [8, 8, 8] and plan.kv_heads_per_layer == [2, 2, 2]
    assert len(set(plan.ffn_per_layer)) == 1 and plan.ffn_per_layer[0] < 96
    assert abs(1 - decoder_param_count(lm.adapter) / dense - 0.2) < 0.02
    config = lm.model.config
    assert config.intermediate_size == plan.ffn_per_layer[0]
    assert not getattr(config, "is_heterogeneous", False)
    save_checkpoint(lm, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, logits(lm, x))


def test_ffn_only_adaptive_and_its_limits():
    lm = make_tiny("llama", **GQA, num_hidden_layers=3)
    plan = prune_structured_(lm, make_pruner("flap", ratio=0.2, units="ffn"), ids())
    assert plan.heads_per_layer == [8, 8, 8]
    with pytest.raises(ConfigError, match="units"):
        make_pruner("flap", units="layers")
    with pytest.raises(ConfigError, match="FFN channels"):
        prune_structured_(make_tiny("llama", **GQA), make_pruner("wanda-sp", ratio=0.9, units="ffn"), ids())


@pytest.mark.parametrize("structure", ["uniform", "adaptive"])
def test_heads_only_keeps_every_channel(structure, tmp_path):
    lm = make_tiny("llama", **GQA, num_hidden_layers=3)
    dense = decoder_param_count(lm.adapter)
    x = ids()
    plan = prune_structured_(lm, make_pruner("wanda-sp", ratio=0.1, units="heads", structure=structure), x)
    assert plan.ffn_per_layer == [96, 96, 96]
    assert sum(plan.heads_per_layer) < 24
    assert all(h % kv == 0 for h, kv in zip(plan.heads_per_layer, plan.kv_heads_per_layer, strict=True))
    assert abs(1 - decoder_param_count(lm.adapter) / dense - 0.1) < 0.03
    with pytest.raises(ConfigError, match="attention"):
        prune_structured_(make_tiny("llama", **GQA), make_pruner("wanda-sp", ratio=0.5, units="heads"), x)
