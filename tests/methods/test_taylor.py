"""LLM-Pruner (taylor): importances against hand computations, groups, scope, structures, CLI."""

import copy
from dataclasses import asdict

import pytest
import torch

from codeprune.calibration.gradients import gradient_pass
from codeprune.cli import main
from codeprune.errors import ConfigError
from codeprune.methods import make_pruner
from codeprune.methods.structured.base import aggregate, parse_scope, scope_layers
from codeprune.methods.structured.plan import decoder_param_count
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.structured.units import attention_units
from codeprune.models.checkpoint import needs_modeling_file, save_checkpoint
from codeprune.models.counting import count_parameters

from ..conftest import make_tiny

GQA = dict(num_attention_heads=8, num_key_value_heads=2)  # 4 query heads per KV head, head_dim 8
FULL = (0.0, 1.0)


def ids(n=4, length=24, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def hand_gradients(lm, x):
    """(mean gradient, mean squared per-sample gradient) of every parameter, by plain autograd."""
    g_sum, f_sum = {}, {}
    for k in range(x.shape[0]):
        lm.model.zero_grad()
        out = lm.model(input_ids=x[k:k + 1], labels=x[k:k + 1])
        out.loss.backward()
        for name, p in lm.model.named_parameters():
            if p.grad is not None:
                g_sum[name] = g_sum.get(name, 0) + p.grad.detach().clone()
                f_sum[name] = f_sum.get(name, 0) + p.grad.detach().square()
    lm.model.zero_grad()
    n = x.shape[0]
    return {k: v / n for k, v in g_sum.items()}, {k: v / n for k, v in f_sum.items()}


def by_hand(lm, layer: int, importance: str, agg="sum"):
    """(per query head, per KV head, per channel) importance of ``layer`` written out directly."""
    g, F = hand_gradients(copy.deepcopy(lm), ids())
    hd = lm.adapter.head_dim
    pre = f"model.layers.{layer}."

    def elems(sub, kind="weight"):
        W = dict(lm.model.named_parameters())[pre + sub + "." + kind].detach()
        G, FF = g[pre + sub + "." + kind], F[pre + sub + "." + kind]
        if importance == "element1":
            return (W * G).abs(), None
        if importance == "element2":
            return (W * G - 0.5 * W * FF * W).abs(), None
        return None, W * G  # vector

    def rows(sub):
        e, v = elems(sub)
        return e.sum(1) if e is not None else v.sum(1).abs()

    def cols(sub):
        e, v = elems(sub)
        return e.sum(0) if e is not None else v.sum(0).abs()

    def per_head(t):
        return t.reshape(-1, hd).sum(1)

    head = aggregate(torch.stack([per_head(rows("self_attn.q_proj")), per_head(cols("self_attn.o_proj"))]),
                     agg)
    kv = aggregate(torch.stack([per_head(rows("self_attn.k_proj")), per_head(rows("self_attn.v_proj"))]),
                   agg)
    channel = aggregate(torch.stack([rows("mlp.gate_proj"), rows("mlp.up_proj"), cols("mlp.down_proj")]), agg)
    return head, kv, channel


def score_model(pruner, lm, input_ids, layers=(0, 1)):
    """What the structured driver does for a ModelScoreMethod: the pass it asks for, then its scores."""
    request = pruner.gradient_request(list(layers))
    grads = gradient_pass(lm, input_ids, device="cpu", **asdict(request)) if request else None
    return pruner.model_scores(lm, grads, list(layers))


@pytest.mark.parametrize("importance", ["element1", "element2", "vector"])
def test_importance_equals_the_hand_computation(importance):
    lm = make_tiny("llama", **GQA)
    pruner = make_pruner("taylor", importance=importance, scope=FULL)
    scores = score_model(pruner, copy.deepcopy(lm), ids())
    for layer in (0, 1):
        head, kv, channel = by_hand(lm, layer, importance)
        torch.testing.assert_close(scores[layer].head, head.double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores[layer].kv, kv.double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores[layer].channel, channel.double(), rtol=1e-4, atol=1e-7)


def test_element1_of_one_channel_is_w_times_grad():
    """The definition, on one FFN channel: |W_gate[j] g| + |W_up[j] g| + |W_down[:, j] g|."""
    lm = make_tiny("llama")
    g, _ = hand_gradients(copy.deepcopy(lm), ids())
    p = dict(lm.model.named_parameters())
    j, pre = 5, "model.layers.1.mlp."
    rows = ("gate_proj.weight", "up_proj.weight")
    expected = sum(float((p[pre + n].detach()[j] * g[pre + n][j]).abs().sum()) for n in rows)
    down = pre + "down_proj.weight"
    expected += float((p[down].detach()[:, j] * g[down][:, j]).abs().sum())
    scores = score_model(make_pruner("taylor", scope=FULL), lm, ids())
    assert float(scores[1].channel[j]) == pytest.approx(expected, rel=1e-4)


def test_qwen2_biases_count_in_their_rows_importance():
    lm = make_tiny("qwen2")  # q/k/v have biases
    g, _ = hand_gradients(copy.deepcopy(lm), ids())
    p = dict(lm.model.named_parameters())
    pre, hd = "model.layers.0.self_attn.", lm.adapter.head_dim
    kv0 = sum(float((p[pre + f"{s}_proj.weight"].detach()[:hd] * g[pre + f"{s}_proj.weight"][:hd]).abs().sum()
                    + (p[pre + f"{s}_proj.bias"].detach()[:hd] * g[pre + f"{s}_proj.bias"][:hd]).abs().sum())
              for s in ("k", "v"))
    scores = score_model(make_pruner("taylor", scope=FULL), lm, ids())
    assert float(scores[0].kv[0]) == pytest.approx(kv0, rel=1e-4)


def test_gradient_pass_touches_only_the_layers_in_scope():
    lm = make_tiny("llama")
    before = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    grads = gradient_pass(lm, ids(), [1], second_order=True)
    assert {k.split(".")[0] for k in grads.grad} == {"1"}
    assert set(grads.grad) == set(grads.fisher)
    assert len(grads.grad) == 7  # the seven Linears' weights of layer 1 (llama: no biases)
    assert all(p.grad is None for p in lm.model.parameters())  # freed as they were folded in
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == before
    assert grads.samples == 4 and grads.loss > 0


def test_checkpointing_does_not_change_the_gradients():
    lm = make_tiny("llama")
    a = gradient_pass(copy.deepcopy(lm), ids(), [0, 1], checkpointing=True)
    b = gradient_pass(copy.deepcopy(lm), ids(), [0, 1], checkpointing=False)
    for k in a.grad:
        torch.testing.assert_close(a.grad[k], b.grad[k], rtol=1e-5, atol=1e-7)


def test_aggregations():
    members = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    assert aggregate(members, "sum").tolist() == [4.0, 2.5]
    assert aggregate(members, "mean").tolist() == [2.0, 1.25]
    assert aggregate(members, "max").tolist() == [3.0, 2.0]
    assert aggregate(members, "prod").tolist() == [3.0, 1.0]
    with pytest.raises(ConfigError):
        aggregate(members, "median")


def test_a_kv_group_unit_adds_its_kv_head():
    head = torch.tensor([1.0, 1.0, 5.0, 5.0])  # two KV groups of two query heads
    units = attention_units(head, 2, 2, "group", kv=torch.tensor([10.0, 0.0]), agg="sum")
    assert [(score, kv) for score, _, kv in units] == [(10.0, [1]), (12.0, [0])]


def test_removing_a_head_group_removes_its_qkv_rows_and_o_columns():
    lm = make_tiny("qwen2", **GQA)
    dense = copy.deepcopy(lm)
    pruner = make_pruner("taylor", ratio=0.3, head_unit="group", scope=FULL)
    plan = prune_structured_(lm, pruner, ids())
    hd = lm.adapter.head_dim
    for i, lp in enumerate(plan.layers):
        assert len(lp.q_heads) == 4 * len(lp.kv_heads)  # whole groups
        new = lm.adapter.linears(lm.adapter.layers()[i])
        old = dense.adapter.linears(dense.adapter.layers()[i])
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in lp.q_heads])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in lp.kv_heads])
        assert torch.equal(new["q_proj"].weight, old["q_proj"].weight[q_rows])
        assert torch.equal(new["q_proj"].bias, old["q_proj"].bias[q_rows])
        for s in ("k_proj", "v_proj"):
            assert torch.equal(new[s].weight, old[s].weight[kv_rows])
        assert torch.equal(new["o_proj"].weight, old["o_proj"].weight[:, q_rows])
        ch = torch.tensor(lp.channels)
        assert torch.equal(new["down_proj"].weight, old["down_proj"].weight[:, ch])
    assert plan.kv_heads_per_layer == [len(lp.kv_heads) for lp in plan.layers]
    assert plan.planned_params["total"] == count_parameters(lm.model)[0]


def test_query_unit_under_gqa_keeps_every_kv_head():
    lm = make_tiny("llama", **GQA)
    plan = prune_structured_(lm, make_pruner("taylor", ratio=0.3, scope=FULL), ids())
    assert plan.kv_heads_per_layer == [2, 2]
    assert all(h < 8 for h in plan.heads_per_layer)


@pytest.mark.parametrize("structure", ["uniform", "adaptive"])
@pytest.mark.parametrize("importance", ["element1", "element2", "vector", "l2", "random"])
def test_ratio_is_met_and_the_model_runs(structure, importance):
    lm = make_tiny("llama", **GQA, num_hidden_layers=4)
    dense = decoder_param_count(lm.adapter)
    pruner = make_pruner("taylor", ratio=0.25, structure=structure, importance=importance, scope=FULL)
    plan = prune_structured_(lm, pruner, ids() if pruner.uses_data else None)
    assert abs(1 - decoder_param_count(lm.adapter) / dense - 0.25) < 0.02
    assert plan.planned_params["decoder"] == decoder_param_count(lm.adapter)
    assert lm.model(input_ids=ids()).logits.isfinite().all()


def test_baselines_need_no_data_and_random_is_seeded():
    plans = []
    for seed in (0, 0, 1):
        lm = make_tiny("llama", **GQA, num_hidden_layers=4)
        pruner = make_pruner("taylor", importance="random", seed=seed, ratio=0.3)
        assert not pruner.uses_data
        plans.append(prune_structured_(lm, pruner, None))
    assert [lp.channels for lp in plans[0].layers] == [lp.channels for lp in plans[1].layers]
    assert [lp.channels for lp in plans[0].layers] != [lp.channels for lp in plans[2].layers]


def test_scope_keeps_the_first_and_last_layers_whole():
    lm = make_tiny("llama", **GQA, num_hidden_layers=10)
    dense = copy.deepcopy(lm)
    assert scope_layers((0.1, 0.9), 10) == list(range(1, 9))
    plan = prune_structured_(lm, make_pruner("taylor", ratio=0.2), ids())  # default scope 0.1:0.9
    for i in (0, 9):
        for name, lin in lm.adapter.linears(lm.adapter.layers()[i]).items():
            assert torch.equal(lin.weight, dense.adapter.linears(dense.adapter.layers()[i])[name].weight)
    assert plan.ffn_per_layer[0] == plan.ffn_per_layer[9] == 96
    assert all(c < 96 for c in plan.ffn_per_layer[1:9])
    assert abs(1 - decoder_param_count(lm.adapter) / decoder_param_count(dense.adapter) - 0.2) < 0.02
    assert needs_modeling_file(lm.model.config)  # layers of two sizes: per_layer_config
    assert any("layer scope" in n for n in plan.notes)


def test_uniform_over_the_whole_depth_is_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_tiny("llama")  # 4 heads -> 2: LlamaConfig accepts 64 / 2 as a global head count
    plan = prune_structured_(lm, make_pruner("taylor", ratio=0.3, scope="0:1"), ids())
    assert plan.heads_per_layer == [2, 2]
    assert not needs_modeling_file(lm.model.config)
    save_checkpoint(lm, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, lm.model(input_ids=x).logits)


def test_bad_options():
    for bad in ("0.9:0.1", "a:b", "0.2", (0, 2)):
        with pytest.raises(ConfigError):
            parse_scope(bad)
    with pytest.raises(ConfigError):
        make_pruner("taylor", importance="hessian")
    with pytest.raises(ConfigError):
        make_pruner("taylor", aggregation="median")
    with pytest.raises(ConfigError):
        scope_layers((0.0, 0.01), 10)
    lm = make_tiny("llama", num_hidden_layers=10)
    with pytest.raises(ConfigError, match="lower the ratio or widen the scope"):
        prune_structured_(lm, make_pruner("taylor", ratio=0.8, scope="0.4:0.6"), ids())
    with pytest.raises(ConfigError, match="offload"):
        prune_structured_(lm, make_pruner("taylor"), ids(), offload=True)


def test_cli_taylor_and_its_errors(tmp_path, capsys):
    lm = make_tiny("llama")
    save_checkpoint(lm, tmp_path / "tiny")
    common = ["prune", "--model", str(tmp_path / "tiny"), "--method", "taylor", "--samples", "4",
              "--seq-len", "32", "--no-eval"]
    assert main(common + ["--ratio", "0.2", "--scope", "2:3"]) == 2
    assert "bad layer scope" in capsys.readouterr().err
    assert main(common + ["--ratio", "0.3", "--importance", "element2", "--aggregation", "max",
                          "--scope", "0:1", "--out", str(tmp_path / "out"), "--json"]) == 0
    out = capsys.readouterr().out
    report = __import__("json").loads(out[out.index("{"):])
    assert report["method_options"]["importance"] == "element2"
    assert report["method_options"]["aggregation"] == "max"
    assert report["gradient_pass"]["samples"] == 4
    assert report["export"] == "plain"


@pytest.mark.parametrize("importance, checkpointing", [("element1", True), ("element1", False), ("l2", True)])
def test_compensation_statistics_come_from_the_forward_passes_only(importance, checkpointing):
    lm = make_tiny("llama", **GQA)
    x = ids()
    pruner = make_pruner("taylor", importance=importance, compensation=True, scope=FULL,
                         checkpointing=checkpointing)
    assert pruner.uses_data
    grads = gradient_pass(copy.deepcopy(lm), x, [0, 1], input_stats=True, checkpointing=checkpointing,
                          backward=importance != "l2")
    assert all(st.count == x.numel() for st in grads.stats.values())  # not doubled by recomputation
    assert set(grads.stats) == {"0.o_proj", "0.down_proj", "1.o_proj", "1.down_proj"}
    plan = prune_structured_(lm, pruner, x)
    assert all(lp.o_bias is not None and lp.down_bias is not None for lp in plan.layers)
    assert lm.adapter.linears(lm.adapter.layers()[0])["down_proj"].bias is not None


def test_compensation_with_the_default_scope():
    """Layers outside the scope lose nothing and need no compensation value."""
    lm = make_tiny("llama", **GQA, num_hidden_layers=10)
    x = ids()
    plan = prune_structured_(lm, make_pruner("taylor", ratio=0.2, compensation=True), x)
    assert plan.layers[0].o_bias is None and plan.layers[5].o_bias is not None
    assert plan.planned_params["decoder"] == decoder_param_count(lm.adapter)
    assert lm.model(input_ids=x).logits.isfinite().all()
