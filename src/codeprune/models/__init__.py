"""Model sources (hub, folder, GGUF, offline aliases) and architecture adapters."""

from .adapters import ADAPTERS, DecoderAdapter, get_adapter, supported_model_types
from .sources import OFFLINE_MODELS, LoadedModel, load_model

__all__ = [
    "ADAPTERS", "DecoderAdapter", "get_adapter", "supported_model_types",
    "OFFLINE_MODELS", "LoadedModel", "load_model",
]
