"""codeprune: prune code LLMs and measure what it cost.

    import codeprune
    result = codeprune.prune("smollm2-135m", "wanda", sparsity=0.5, out="runs/wanda50")
"""

from .api import (
    PruneResult,
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
from .errors import (
    CodepruneError,
    ConfigError,
    CorpusError,
    CorruptModelError,
    ModelNotFoundError,
    ModelNotInstalledError,
    OutputExistsError,
    UnsupportedArchitectureError,
)
from .models.sources import LoadedModel

__version__ = "0.1.0"

__all__ = [
    "CodepruneError", "ConfigError", "CorpusError", "CorruptModelError", "LoadedModel",
    "ModelNotFoundError", "ModelNotInstalledError", "OutputExistsError", "PruneResult",
    "UnsupportedArchitectureError", "compare", "distill_data", "evaluate", "instructions", "load", "prune",
    "recover", "report", "sweep",
]
