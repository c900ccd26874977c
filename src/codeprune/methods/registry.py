"""registry."""

from __future__ import annotations

from codeprune.errors import ConfigError

METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls: type) -> type:
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def make_pruner(method: str, **options) -> object:
    """The registered method ``method`` configured with ``options``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    try:
        config = cls.config_class(**options)
    except TypeError as e:
        raise ConfigError(f"bad option for {method}: {e}") from None
    return cls(config)
