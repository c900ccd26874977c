"""qwen3."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class Qwen3Adapter(DecoderAdapter):
    """Qwen3 (per-head q_norm/k_norm inside attention; same Linear layout)."""

    model_types = ("qwen3",)
    bias_flags = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")}
