"""The method registry: every pruning method by name.

    @register("wanda")
    class WandaPruner(UnstructuredMethod): ...

    method = make_pruner("wanda", sparsity=0.5, pattern="2:4")   # validated config, ConfigError otherwise

The CLI's ``--method`` choices and the recipe stages come from ``METHODS``.
"""

from __future__ import annotations

import dataclasses

from codeprune.errors import ConfigError
from codeprune.methods.contract import Method, Produces

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: register a ``Method`` subclass under ``name``."""
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def make_pruner(method: str, **options) -> Method:
    """The registered method ``method`` configured with ``options`` (its config dataclass's fields)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    try:
        config = cls.config_class(**options)
    except TypeError as e:
        raise ConfigError(f"bad option for {method}: {e}") from None
    return cls(config)


def option_default(method: str, name: str):
    """The default of option ``name`` of ``method`` (its config dataclass's field default)."""
    return next(f.default for f in dataclasses.fields(METHODS[method].config_class) if f.name == name)


def is_structured(method: str) -> bool:
    """Whether ``method`` removes structures (produces a plan) rather than masking weights."""
    cls = METHODS.get(method)
    return cls is not None and cls.produces is Produces.PLAN
