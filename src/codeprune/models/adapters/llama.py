"""Llama adapter: the reference layout the base class describes."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """Llama 2/3, CodeLlama, SmolLM2, DeepSeek-Coder: the base layout; ``attention_bias`` and
    ``mlp_bias`` switch on biases of the attention and MLP Linears."""

    model_types = ("llama",)
    transformers_family = ("llama", "Llama")
    bias_flags = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}
    gguf_arch = "llama"
