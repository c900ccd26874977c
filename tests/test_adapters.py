"""Adapter contract: one small subclass per architecture on a tiny random model."""

import pytest
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from codeprune.errors import UnsupportedArchitectureError
from codeprune.models.adapters import ADAPTERS, get_adapter, supported_model_types
from codeprune.models.adapters.base import SUBLAYERS

from .conftest import make_tiny


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

    def test_linear_shapes(self, lm):
        a = lm.adapter
        for layer in a.layers():
            lin = a.linears(layer)
            assert list(lin) == list(SUBLAYERS)
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


def test_every_registered_type_has_a_contract_test():
    tested = {c.model_type for c in AdapterContract.__subclasses__()}
    assert tested == set(ADAPTERS)


def test_unknown_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "gpt2" in msg and all(t in msg for t in supported_model_types())
