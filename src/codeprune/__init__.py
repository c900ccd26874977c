"""codeprune: prune code LLMs and measure what it cost.

    import codeprune
    result = codeprune.prune("smollm2-135m", "wanda", sparsity=0.5, out="runs/wanda50")

The functions below come from ``codeprune.api`` and are imported on first use, so
``import codeprune`` (and ``codeprune --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from codeprune.errors import (
    CodepruneError,
    ConfigError,
    CorpusError,
    CorruptModelError,
    ModelNotFoundError,
    ModelNotInstalledError,
    OutputExistsError,
    UnsupportedArchitectureError,
)
from codeprune.version import __version__

_API = ("PruneResult", "RecoverResult", "compare", "distill_data", "evaluate", "instructions", "load",
        "prune", "recover", "report", "sweep")
_LAZY = {name: "codeprune.api" for name in _API} | {"LoadedModel": "codeprune.models.loading"}

if TYPE_CHECKING:
    from codeprune.api import (
        PruneResult,
        RecoverResult,
        compare,
        distill_data,
        evaluate,
        instructions,
        load,
        prune,
        recover,
        report,
        sweep,
    )
    from codeprune.models.loading import LoadedModel


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'codeprune' has no attribute '{name}'")


__all__ = [
    "CodepruneError", "ConfigError", "CorpusError", "CorruptModelError", "LoadedModel",
    "ModelNotFoundError", "ModelNotInstalledError", "OutputExistsError", "PruneResult", "RecoverResult",
    "UnsupportedArchitectureError", "__version__", "compare", "distill_data", "evaluate", "instructions",
    "load", "prune", "recover", "report", "sweep",
]
