"""Devices: resolve a user's ``--device`` and place a whole model there.

The workflows place models for evaluation; the engine and the gradient pass place
what they run. Methods never place models, layers or data.
"""

from __future__ import annotations

import torch

from codeprune.errors import ConfigError
from codeprune.models.loading import LoadedModel


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available (use --device cpu)")
    return dev


def place_model(lm: LoadedModel, device: str | torch.device) -> torch.device:
    """Move the whole model to ``device`` (for evaluation without offload); returns the device."""
    dev = resolve_device(device)
    lm.model.to(dev)
    return dev
