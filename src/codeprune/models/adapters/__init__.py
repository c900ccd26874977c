"""Architecture adapters, one file per family, looked up by ``config.model_type``.

    >>> adapter = get_adapter(model)
    >>> for i, layer in enumerate(adapter.layers()):
    ...     linears = adapter.linears(layer)   # {"q_proj": Linear, ..., "down_proj": Linear}

``ADAPTERS`` is the registry (model_type -> adapter class, built from the classes
listed below); docs/adding-an-architecture.md says how to add a family.
"""

from __future__ import annotations

from torch import nn

from codeprune.errors import UnsupportedArchitectureError
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.adapters.llama import LlamaAdapter
from codeprune.models.adapters.mistral import MistralAdapter
from codeprune.models.adapters.qwen2 import Qwen2Adapter
from codeprune.models.adapters.qwen3 import Qwen3Adapter

ADAPTERS: dict[str, type[DecoderAdapter]] = {
    t: cls for cls in (LlamaAdapter, Qwen2Adapter, MistralAdapter, Qwen3Adapter) for t in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def check_supported(config) -> type[DecoderAdapter]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': codeprune supports "
            f"{', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model`` (looked up by ``config.model_type``)."""
    return check_supported(model.config)(model)


__all__ = ["ADAPTERS", "DecoderAdapter", "check_supported", "get_adapter", "supported_model_types"]
