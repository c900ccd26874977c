"""Mistral adapter: the Llama layout (sliding-window attention lives in the config)."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class MistralAdapter(DecoderAdapter):
    """Mistral / Codestral-style models: the base layout, no bias flags."""

    model_types = ("mistral",)
    transformers_family = ("mistral", "Mistral")
    gguf_arch = "llama"  # llama.cpp runs Mistral as llama (sliding window: see gguf_export)
