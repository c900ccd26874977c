"""mistral."""

from __future__ import annotations

from codeprune.models.adapters.base import DecoderAdapter


class MistralAdapter(DecoderAdapter):
    model_types = ("mistral",)
