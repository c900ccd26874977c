"""Pruning methods, registered by name (``METHODS``): unstructured / N:M methods
(``Pruner``, methods/base.py) and structured ones (``StructuredPruner``,
methods/structured.py; they set ``structured = True``)."""

from . import flap, magnitude, sparsegpt, taylor, wanda  # noqa: F401  (registration)
from .base import METHODS, PruneConfig, Pruner, make_pruner, parse_pattern, register


def is_structured(method: str) -> bool:
    return bool(getattr(METHODS.get(method), "structured", False))


SPARSE_METHODS = tuple(sorted(m for m in METHODS if not is_structured(m)))
STRUCTURED_METHODS = tuple(sorted(m for m in METHODS if is_structured(m)))

__all__ = ["METHODS", "SPARSE_METHODS", "STRUCTURED_METHODS", "PruneConfig", "Pruner", "is_structured",
           "make_pruner", "parse_pattern", "register"]
