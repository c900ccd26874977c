"""Pruning methods, registered by name (``METHODS``)."""

from . import flap, magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from .base import METHODS, PruneConfig, Pruner, make_pruner, parse_pattern, register

__all__ = ["METHODS", "PruneConfig", "Pruner", "make_pruner", "parse_pattern", "register"]
