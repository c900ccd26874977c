"""Options in one place: help text, choices and CLI spelling carried by config dataclass fields.

A config dataclass (a method's ``PruneConfig`` / ``StructuredConfig`` subclass,
``RecoverConfig``, ``DistillConfig``, ``HumanEvalConfig``) declares each option once:

    @dataclass
    class FlapConfig(StructuredConfig):
        metric: str = opt("wifv", "FLAP's fluctuation metric", choices=METRICS)

and ``codeprune.cli`` generates its flags (``--metric {wifv,ifv,wifn}``) from
``config_options(FlapConfig)`` while recipes/spec.py takes its allow-lists from
``option_names``. A subclass that only changes a default (``structure: str =
"adaptive"``) keeps the help of the class that declared the field. This module
imports nothing but the standard library, so that ``codeprune --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

KEY = "codeprune"  # the key of our entry in a field's metadata


@dataclass(frozen=True)
class Meta:
    """What ``opt`` records about one field."""

    help: str
    choices: tuple | None = None
    metavar: str | None = None
    flag: str | None = None  # the CLI flag when it is not --field-name
    type: Any = None  # the CLI parser of the value; default from the field's default
    sep: str = ","  # how a tuple is written on the command line
    cli: bool = True  # False: no flag is generated (the command supplies the value itself)


def opt(default: Any = MISSING, help: str = "", *, choices=None, metavar: str | None = None,
        flag: str | None = None, type: Any = None, sep: str = ",", cli: bool = True) -> Any:
    """A dataclass field with ``default`` and its help text, choices and CLI spelling."""
    meta = Meta(help, tuple(choices) if choices is not None else None, metavar, flag, type, sep, cli)
    return dataclasses.field(default=default, metadata={KEY: meta})


@dataclass(frozen=True)
class Option:
    """One option of one config class, as the CLI and the recipe checks see it."""

    name: str
    default: Any  # this class's default (a subclass may change it)
    meta: Meta
    owner: type  # the most basic config class that declares the field (its "family")

    @property
    def flag(self) -> str:
        return self.meta.flag or "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    def parse(self, text: str) -> Any:
        """The value of the command-line text ``text`` (ValueError when it does not parse)."""
        if self.meta.type is not None:
            return self.meta.type(text)
        if isinstance(self.default, tuple):
            kind = type(self.default[0]) if self.default else str
            return tuple(kind(p.strip()) for p in text.split(self.meta.sep) if p.strip())
        if isinstance(self.default, (int, float)) and not self.is_bool:
            return type(self.default)(text)
        return text

    def show(self, value: Any) -> str:
        """``value`` as a user writes it on the command line."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return self.meta.sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return str(value)


def _meta(cls: type, name: str) -> tuple[Meta, type]:
    """The metadata of field ``name`` and the most basic class in ``cls``'s MRO declaring it."""
    found, owner = None, cls
    for klass in cls.__mro__:
        declared = vars(klass).get("__dataclass_fields__", {})
        if name in declared:
            owner = klass
            found = declared[name].metadata.get(KEY) or found
    return found or Meta(help=""), owner


def config_options(cls: type) -> list[Option]:
    """Every field of the config dataclass ``cls`` as an ``Option``, in declaration order."""
    result = []
    for f in dataclasses.fields(cls):
        meta, owner = _meta(cls, f.name)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        result.append(Option(f.name, default, meta, owner))
    return result


def option_names(cls: type) -> set[str]:
    """The field names of ``cls``: the keys a recipe stage or an API call may give it."""
    return {f.name for f in dataclasses.fields(cls)}



_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


def count(text: str) -> int:
    """A count as people write it: ``200000``, ``200_000``, ``200k``, ``1.5M`` (ValueError
    otherwise)."""
    t = str(text).strip().lower().replace("_", "")
    scale = _SUFFIXES.get(t[-1:], 1)
    value = float(t[:-1] if scale > 1 else t)
    if value != value or value in (float("inf"), float("-inf")) or value * scale != int(value * scale):
        raise ValueError(f"not a whole count: {text!r}")
    return int(value * scale)
