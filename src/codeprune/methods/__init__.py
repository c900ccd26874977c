"""Pruning methods, registered by name (``METHODS``), all under one contract (contract.py) and
one dispatcher (dispatch.py: ``run_method``).

- ``unstructured/``: magnitude, wanda, sparsegpt (masks, unstructured or N:M);
- ``structured/``: flap, wanda-sp, magnitude-sp, taylor (a structure plan, then surgery);
- ``depth``: which decoder layers to drop (Flab-Pruner's KL search, ShortGPT's block influence);
- ``vocab``: which tokens to drop, and the tokenizer rebuild.
"""

from codeprune.methods.contract import Method, MethodResult, Needs, Produces
from codeprune.methods.dispatch import run_method
from codeprune.methods.registry import METHODS, is_structured, make_pruner, option_default, register
from codeprune.methods.structured import flap, taylor  # noqa: F401  (registration)
from codeprune.methods.unstructured import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from codeprune.methods.unstructured.base import PruneConfig, parse_pattern

SPARSE_METHODS = tuple(sorted(m for m in METHODS if not is_structured(m)))

__all__ = ["METHODS", "SPARSE_METHODS", "Method", "MethodResult", "Needs", "Produces", "PruneConfig",
           "is_structured", "make_pruner", "option_default", "parse_pattern", "register", "run_method"]
