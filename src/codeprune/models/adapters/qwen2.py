"""Qwen2 adapter: the Llama layout with q/k/v biases always on."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class Qwen2Adapter(DecoderAdapter):
    """Qwen2 / Qwen2.5(-Coder), CodeQwen1.5: the base layout; q/k/v always carry biases,
    so there is no flag to switch others on."""

    model_types = ("qwen2",)
    transformers_family = ("qwen2", "Qwen2")
    gguf_arch = "qwen2"
    gguf_interleaved_rope = False
    gguf_fixed_width = True

    @property
    def sliding_window(self) -> int | None:
        return None  # Qwen2 configs carry a window that applies only with use_sliding_window (off)
