"""llama."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """Llama 2/3, CodeLlama, SmolLM2, DeepSeek-Coder."""

    model_types = ("llama",)
    bias_flags = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}
