"""qwen2."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class Qwen2Adapter(DecoderAdapter):
    """Qwen2 / Qwen2.5(-Coder), CodeQwen1.5 (q/k/v carry biases; same layout)."""

    model_types = ("qwen2",)
