"""What every workflow shares: loading a model with its checks, and the process's peak memory.

Tests replace ``load_model`` here to hand the workflows a tiny model.
"""

from __future__ import annotations

import resource

import torch

from codeprune.errors import ConfigError
from codeprune.models.counting import count_parameters
from codeprune.models.loading import LoadedModel, load_model
from codeprune.reporting.provenance import display_name, sanitise_source


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


def prune_header(lm: LoadedModel, *, params_dense: int, calibration, seconds: float, device) -> dict:
    """The fields every prune report starts with (a prune run, a sweep member): the model and its
    source without local paths, parameter counts, the calibration windows (``TokenWindows`` or
    None when no data was used), the pruning time, memory and device."""
    total, nonzero = count_parameters(lm.model)
    calib = None
    if calibration is not None:
        calib = {**calibration.describe(), "source": display_name(calibration.source)}
    return {"model": display_name(lm.name), "source": sanitise_source(lm.origin, lm.name),
            "notes": [lm.origin["note"]] if lm.origin.get("note") else [],
            "params_dense": params_dense, "params_total": total, "params_nonzero": nonzero,
            "calibration": calib, "seconds_prune": seconds, "peak_rss_mb": peak_rss_mb(),
            "device": str(device)}
