"""Model sources (hub, folder, GGUF, offline aliases) and architecture adapters."""

from codeprune.models.adapters import ADAPTERS, get_adapter, supported_model_types
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.loading import LoadedModel, load_model
from codeprune.models.offline import OFFLINE_MODELS

__all__ = [
    "ADAPTERS", "DecoderAdapter", "get_adapter", "supported_model_types",
    "OFFLINE_MODELS", "LoadedModel", "load_model",
]
