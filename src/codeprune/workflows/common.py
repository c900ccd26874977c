"""What every workflow shares: loading a model with its checks, and the process's peak memory.

Tests replace ``load_model`` here to hand the workflows a tiny model.
"""

from __future__ import annotations

import resource

import torch

from codeprune.errors import ConfigError
from codeprune.models.loading import LoadedModel, load_model


def load(model: str, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a model: offline alias, .gguf file, local folder or hub id (see ``codeprune models``)."""
    return load_model(model, dtype=dtype)


def as_loaded(model: str | LoadedModel, dtype, seq_len: int) -> LoadedModel:
    """``model`` itself, or loaded by name; ConfigError when ``seq_len`` exceeds its context."""
    lm = model if isinstance(model, LoadedModel) else load(model, dtype=dtype)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
    return lm


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
