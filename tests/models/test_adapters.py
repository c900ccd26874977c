"""Adapter contract: one small subclass per architecture on a tiny random model."""

import importlib

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from codeprune.errors import ConfigError, UnsupportedArchitectureError
from codeprune.models.adapters import ADAPTERS, DecoderAdapter, get_adapter, supported_model_types
from codeprune.models.checkpoint import modeling_file_text, pruned_model_class

from ..conftest import ARCHS, make_tiny

ROLES = ("attention_inputs", "attention_output", "mlp_inputs", "mlp_output")


class AdapterContract:
    model_type = ""
    overrides: dict = {}

    @pytest.fixture
    def lm(self, tiny_tokenizer):
        return make_tiny(self.model_type, tokenizer=tiny_tokenizer, **self.overrides)

    def test_layers_and_modules(self, lm):
        a = lm.adapter
        assert a.num_layers == lm.config.num_hidden_layers == len(a.layers())
        assert isinstance(a.embed_tokens(), nn.Embedding) and isinstance(a.lm_head(), nn.Linear)
        assert a.embed_tokens().weight.shape == (a.vocab_size, a.hidden_size)
        assert a.tied_embeddings == bool(lm.config.tie_word_embeddings)

    def test_roles_describe_the_linears_in_execution_order(self, lm):
        a = lm.adapter
        assert tuple(a.roles) == ROLES
        assert a.sublayer_names == tuple(n for role in ROLES for n in a.roles[role])
        assert a.input_groups == tuple(a.roles[role] for role in ROLES)
        layer = a.layers()[0]
        ran = []
        handles = [lin.register_forward_pre_hook(lambda m, args, n=name: ran.append(n))
                   for name, lin in a.linears(layer).items()]
        with torch.no_grad():
            lm.model(input_ids=torch.arange(8)[None], use_cache=False)
        for h in handles:
            h.remove()
        assert ran == list(a.linears(layer)) == list(a.sublayer_names)
        for role in ROLES:
            assert a.role_linears(layer, role) == [a.linears(layer)[n] for n in a.roles[role]]

    def test_linear_shapes(self, lm):
        a = lm.adapter
        for layer in a.layers():
            lin = a.linears(layer)
            d, hd = a.hidden_size, a.head_dim
            assert lin["q_proj"].weight.shape == (a.num_heads * hd, d)
            assert lin["k_proj"].weight.shape == (a.num_kv_heads * hd, d)
            assert lin["v_proj"].weight.shape == (a.num_kv_heads * hd, d)
            assert lin["o_proj"].weight.shape == (d, a.num_heads * hd)
            assert lin["gate_proj"].weight.shape == (a.intermediate_size, d)
            assert lin["up_proj"].weight.shape == (a.intermediate_size, d)
            assert lin["down_proj"].weight.shape == (d, a.intermediate_size)
            assert a.input_norm(layer) is not a.post_attention_norm(layer)

    def test_tied_lm_head(self, tiny_tokenizer):
        lm = make_tiny(self.model_type, tokenizer=tiny_tokenizer, tie_word_embeddings=True,
                       **self.overrides)
        assert lm.adapter.tied_embeddings

    def test_logits_equal_the_model_forward(self, lm):
        x = torch.arange(10)[None]
        with torch.no_grad():
            expected = lm.model(input_ids=x).logits
            normed = lm.adapter.decoder(input_ids=x).last_hidden_state
            torch.testing.assert_close(lm.adapter.logits(normed, normed=True), expected)
            hidden = []
            h = lm.adapter.layers()[-1].register_forward_hook(lambda m, args, out: hidden.append(out))
            lm.model(input_ids=x)
            h.remove()
            torch.testing.assert_close(lm.adapter.logits(hidden[0]), expected)

    def test_lora_targets_are_real_module_names(self, lm):
        a = lm.adapter
        targets = a.lora_target_modules(a.sublayer_names)
        names = {n for n, _ in lm.model.named_modules()}
        for t in targets:
            assert any(n.endswith("." + t) for n in names), t
        with pytest.raises(ConfigError, match="lm_head"):
            a.lora_target_modules(["lm_head"])

    def test_family_class_for_per_layer_checkpoints(self, lm):
        a = lm.adapter
        module, prefix = a.transformers_family
        parent = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                         f"{prefix}ForCausalLM")
        assert isinstance(lm.model, parent)
        cls = pruned_model_class(lm.config)
        assert issubclass(cls, parent) and cls.__name__ == f"Codeprune{prefix}ForCausalLM"
        assert cls is pruned_model_class(lm.config)  # one class per family
        assert f"{cls.__name__} = make_class({module!r}, {prefix!r}" in modeling_file_text(lm.config)


class TestLlama(AdapterContract):
    model_type = "llama"


class TestQwen2(AdapterContract):
    model_type = "qwen2"

    def test_qkv_bias(self, lm):
        lin = lm.adapter.linears(lm.adapter.layers()[0])
        assert lin["q_proj"].bias is not None and lin["o_proj"].bias is None


class TestMistral(AdapterContract):
    model_type = "mistral"


class TestQwen3(AdapterContract):
    model_type = "qwen3"


def _contract_tests() -> set[str]:
    seen, todo = set(), list(AdapterContract.__subclasses__())
    while todo:
        cls = todo.pop()
        seen.add(cls.model_type)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_registered_type_has_a_contract_test():
    """A new adapter needs a contract test here and a tiny model in conftest.ARCHS."""
    assert _contract_tests() == set(ADAPTERS)
    assert set(ARCHS) == set(ADAPTERS) and len(ARCHS) == len(set(ARCHS))


def test_every_adapter_declares_its_family():
    for model_type, cls in ADAPTERS.items():
        assert cls.transformers_family, f"{cls.__name__} ({model_type}) declares no transformers_family"
        assert set(cls.sublayer_names) <= set(cls.module_paths)


def test_logits_apply_the_family_soft_capping(tiny_llama):
    """Gemma 2/3 cap logits as cap * tanh(logits / cap); the adapter does it from the config."""
    a = tiny_llama.adapter
    h = torch.randn(3, 5, a.hidden_size)
    raw = a.lm_head()(a.final_norm()(h))
    tiny_llama.config.final_logit_softcapping = 0.5
    capped = a.logits(h)
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))
    assert capped.abs().max() <= 0.5


def test_a_fused_family_is_described_by_roles_and_paths():
    """Roles are lists and LoRA targets come from the paths, so fused Linears can be declared."""

    class Fused(DecoderAdapter):
        roles = {"attention_inputs": ("qkv_proj",), "attention_output": ("o_proj",),
                 "mlp_inputs": ("gate_up_proj",), "mlp_output": ("down_proj",)}
        module_paths = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
                        "gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"}

    assert Fused.sublayer_names == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert Fused.input_groups == (("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",))
    assert DecoderAdapter.sublayer_names[0] == "q_proj"  # the base class is untouched
    with pytest.raises(TypeError, match="module_paths"):
        type("Broken", (DecoderAdapter,), {"roles": {"attention_inputs": ("wqkv",)}})


def test_unknown_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "gpt2" in msg and all(t in msg for t in supported_model_types())
