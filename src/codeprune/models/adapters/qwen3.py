"""Qwen3 adapter: the Llama layout with per-head q_norm / k_norm inside attention."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class Qwen3Adapter(DecoderAdapter):
    """Qwen3: the base Linear layout (q_norm / k_norm act per head and are not pruned);
    ``attention_bias`` switches on biases of the attention Linears."""

    model_types = ("qwen3",)
    transformers_family = ("qwen3", "Qwen3")
    bias_flags = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")}
    gguf_arch = "qwen3"
    gguf_interleaved_rope = False
    gguf_layer_norms = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
