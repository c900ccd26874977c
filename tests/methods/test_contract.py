"""The method contract, and the steps of docs/adding-a-method.md followed with two toy methods."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import codeprune
from codeprune.calibration.engine import calibrate_layers
from codeprune.calibration.stats import ChannelStats
from codeprune.errors import ConfigError, UnsupportedArchitectureError
from codeprune.methods import METHODS, Needs, Produces, make_pruner, register, run_method
from codeprune.methods.structured.base import ChannelScoreMethod, StructuredConfig
from codeprune.methods.unstructured.base import PruneConfig, UnstructuredMethod, apply_mask_
from codeprune.methods.unstructured.masks import select_mask
from codeprune.models.adapters import ADAPTERS, get_adapter
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.checkpoint import needs_modeling_file, save_checkpoint
from codeprune.models.counting import count_parameters
from codeprune.options import opt
from codeprune.recipes.spec import parse_recipe

from ..conftest import TINY, make_tiny


@dataclass
class PowerConfig(PruneConfig):
    power: float = opt(2.0, "exponent of |W| in the score")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.power <= 0:
            raise ConfigError(f"power must be > 0, got {self.power}")


class PowerMagnitude(UnstructuredMethod):
    """|W|^p * ||X||: a toy unstructured method that needs layer-wise statistics."""

    config_class = PowerConfig

    def make_stats(self, name: str, linear: nn.Linear) -> ChannelStats:
        return ChannelStats()

    def prune_(self, name: str, linear: nn.Linear, stats: ChannelStats) -> None:
        scores = linear.weight.float().abs() ** self.config.power * stats.l2.float()
        apply_mask_(linear, select_mask(scores, self.config.sparsity, self.config.nm))


class ColumnNorm(ChannelScoreMethod):
    """A toy structured method: a channel's score is its column norm in the output projection."""

    config_class = StructuredConfig
    scores_from_data = False

    def channel_scores(self, module, linears, stats) -> torch.Tensor:
        return linears["o_proj" if module == "attention" else "down_proj"].weight.float().norm(dim=0)


@pytest.fixture
def toys():
    """Register the toys as docs/adding-a-method.md says; unregister afterwards."""
    saved = dict(METHODS)
    register("toy-power")(PowerMagnitude)
    register("toy-colnorm")(ColumnNorm)
    yield
    METHODS.clear()
    METHODS.update(saved)


def test_every_method_declares_needs_and_produces():
    for name in METHODS:
        method = make_pruner(name)
        assert isinstance(method.needs(), Needs) and isinstance(method.produces, Produces), name
    assert make_pruner("magnitude").needs() is Needs.NOTHING
    assert make_pruner("wanda").needs() is Needs.LAYER_STATS
    assert make_pruner("flap").produces is Produces.PLAN and make_pruner("flap").needs() is Needs.LAYER_STATS
    assert make_pruner("magnitude-sp").needs() is Needs.NOTHING
    assert make_pruner("magnitude-sp", compensation=True).needs() is Needs.LAYER_STATS  # means for the biases
    assert make_pruner("taylor").needs() is Needs.GRADIENTS
    assert make_pruner("taylor", importance="l2").needs() is Needs.NOTHING


def test_dispatcher_refuses_what_a_method_cannot_run_on(random_ids):
    lm = make_tiny("llama")
    with pytest.raises(ConfigError, match="needs calibration data"):
        run_method(lm, make_pruner("wanda"), None)
    with pytest.raises(ConfigError, match="drop --offload"):
        run_method(lm, make_pruner("taylor"), random_ids, offload=True)
    run_method(lm, make_pruner("magnitude"), None)  # the weights alone: no data needed


def test_toy_unstructured_method_through_every_entry_point(toys, random_ids, stdlib_dir, tmp_path):
    lm = make_tiny("llama")
    result = run_method(lm, make_pruner("toy-power", sparsity=0.5, power=1.0), random_ids, batch_size=4)
    assert result.produces is Produces.MASKS and len(result.pruned) == 14  # 7 Linears x 2 layers
    for lin in result.pruned:  # each row keeps exactly half of its weights
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    with pytest.raises(ConfigError, match="power must be > 0"):
        make_pruner("toy-power", power=0)

    # its option is a CLI flag and a recipe key, with nothing else edited
    from codeprune.cli.parser import build_parser

    argv = ["prune", "--model", "m", "--method", "toy-power", "--power", "3"]
    args = build_parser("prune").parse_args(argv)
    assert args.power == 3.0
    parse_recipe({"name": "t", "stages": [{"stage": "toy-power", "sparsity": 0.5, "power": 3.0}]})
    with pytest.raises(ConfigError, match="powr"):
        parse_recipe({"name": "t", "stages": [{"stage": "toy-power", "powr": 3.0}]})

    res = codeprune.prune(make_tiny("llama"), "toy-power", sparsity=0.5, pattern="2:4", power=1.5,
                          calib=f"python:{stdlib_dir}", samples=4, seq_len=32, eval_ppl=False,
                          efficiency=False, out=tmp_path / "run")
    assert res.report["method"] == "toy-power" and res.report["sparsity_actual"] == pytest.approx(0.5)
    assert (res.out / "model.safetensors").is_file()


def test_toy_structured_method_produces_a_plan(toys, stdlib_dir):
    lm = make_tiny("llama")
    before = count_parameters(lm.model)[0]
    res = codeprune.prune(lm, "toy-colnorm", ratio=0.25, structure="uniform", calib=f"python:{stdlib_dir}",
                          samples=4, seq_len=32, eval_ppl=False, efficiency=False)
    r = res.report
    assert r["pruning"] == "structured" and r["calibration"] is None  # needs nothing but the weights
    assert r["ratio_actual_decoder"] == pytest.approx(0.25, abs=0.05)
    assert count_parameters(lm.model)[0] < before
    assert set(r["ffn_per_layer"]) == {lm.adapter.layer_sizes(lm.adapter.layers()[0])["intermediate"]}


# -- docs/adding-an-architecture.md, followed for SmolLM3 (a Llama-layout family not registered) -----

class SmolLM3Adapter(DecoderAdapter):
    """SmolLM3: the Llama layout (some layers skip RoPE, which the model's own forward handles)."""

    model_types = ("smollm3",)
    transformers_family = ("smollm3", "SmolLM3")
    bias_flags = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def test_toy_family_through_the_steps(monkeypatch, tiny_tokenizer, random_ids, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from codeprune.models.loading import LoadedModel, load_model

    def tiny_smollm3():
        config = AutoConfig.for_model("smollm3", vocab_size=len(tiny_tokenizer), pad_token_id=0, **TINY)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        return LoadedModel(model, tiny_tokenizer, get_adapter(model), "tiny-smollm3", {"kind": "test"})

    with pytest.raises(UnsupportedArchitectureError, match="smollm3"):
        tiny_smollm3()
    monkeypatch.setitem(ADAPTERS, "smollm3", SmolLM3Adapter)  # step 2: the registry
    lm = tiny_smollm3()
    ids = random_ids[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(lm.adapter.logits(lm.adapter.decoder(ids).last_hidden_state, normed=True),
                                   lm.model(ids).logits)
    # the engine's per-layer statistics equal those of a hooked full forward (NoPE layers included)
    seen = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, a[0].detach().clone()))
             for i, lin in enumerate(lm.adapter.role_linears(layer, "mlp_output")[0]
                                     for layer in lm.adapter.layers())]
    with torch.no_grad():
        lm.model(ids[:4])
    for h in hooks:
        h.remove()
    stats = {}
    calibrate_layers(lm, ids[:4], make_stats=lambda name, _: ChannelStats() if name == "down_proj" else None,
                     on_layer=lambda i, layer, linears, st: stats.__setitem__(i, st["down_proj"].l2))
    for i, x in seen.items():
        l2 = x.double().reshape(-1, x.shape[-1]).norm(dim=0)
        torch.testing.assert_close(stats[i], l2, rtol=1e-4, atol=1e-5)

    # a per-layer (adaptive) structured result saves and loads, with codeprune and with plain transformers
    run_method(lm, make_pruner("flap", ratio=0.3), ids)
    assert needs_modeling_file(lm.model.config)
    save_checkpoint(lm, tmp_path / "ckpt")
    with torch.no_grad():
        expected = lm.model(ids).logits
        for loaded in (load_model(str(tmp_path / "ckpt")).model,
                       AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)):
            torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
