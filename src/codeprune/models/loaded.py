"""``LoadedModel``: a causal LM with its tokenizer and architecture adapter, as codeprune passes it around.

    lm = codeprune.load("smollm2-135m")      # models/loading.py builds one
    lm.model, lm.tokenizer, lm.adapter, lm.origin
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from codeprune.models.adapters.base import DecoderAdapter


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and architecture adapter."""

    model: nn.Module
    tokenizer: object
    adapter: DecoderAdapter
    name: str  # what the user asked for
    # kind, path, base_model, license, model_type, dtype (the source's), a note on quantized sources
    origin: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config
