"""Arguments shared by several subcommands, and flags generated from config dataclasses.

The options of a config dataclass (a method's config, ``RecoverConfig``,
``DistillConfig``, ``HumanEvalConfig``) become flags through ``add_config_options``:
help, choices and CLI spelling come from the fields' metadata (codeprune/options.py),
so a new option is one line in its config.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from codeprune.errors import ConfigError
from codeprune.options import Option, config_options

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Command:
    """One subcommand: its line in ``codeprune --help``, its examples, and what adds its arguments."""

    help: str
    examples: tuple[str, ...]
    build: Callable[[argparse.ArgumentParser], None]


def add_common(p: argparse.ArgumentParser, model_required: bool = True, offload: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="offline alias (see `codeprune models`), .gguf file, folder or hub id")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--text-field", default="text", help="field of .jsonl / hf: sources (default text)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    if offload:
        p.add_argument("--offload", action="store_true",
                       help="keep the model on the CPU, one layer at a time on --device")
    add_json(p)


def add_json(p: argparse.ArgumentParser, what: str = "the report") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_save_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dtype", choices=DTYPES,
                   help="dtype of the saved weights (default: the source's; bfloat16 for a dequantized GGUF)")


def add_config_options(p: argparse.ArgumentParser, classes: dict[str, type], *,
                       title: Callable[[list[str]], str] | None = None) -> tuple[str, ...]:
    """Add a flag for every CLI option of the config classes ``{user name: config class}``, one
    argument group per class that declares options (the family: e.g. every structured method),
    and return their names. Every flag defaults to None: "the config's default", given in the help
    (per user where they differ). The command passes only the options given (``given_options``)."""
    per_user = {user: {o.name: o for o in config_options(cls)} for user, cls in classes.items()}
    families: dict[type, dict[str, Option]] = {}
    for options in per_user.values():
        for o in options.values():
            if o.meta.cli and not any(o.name in f for f in families.values()):
                families.setdefault(o.owner, {})[o.name] = o
    added = []
    for owner in sorted(families, key=lambda c: len(c.__mro__)):  # shared families first
        options = families[owner]
        users = [u for u, cls in classes.items() if issubclass(cls, owner)]
        described = len(families) > 1  # a family's docstring tells the groups apart
        group = p.add_argument_group(title(users), _description(owner) if described else None) if title else p
        for o in options.values():
            defaults = {u: per_user[u][o.name].default for u in users if o.name in per_user[u]}
            _add_option(group, o, defaults)
            added.append(o)
    p.set_defaults(config_options=tuple(added))
    return tuple(o.name for o in added)


def given_options(args: argparse.Namespace) -> dict:
    """The config options given on the command line (those left out keep the config's default)."""
    given = {}
    for o in getattr(args, "config_options", ()):
        value = getattr(args, o.name)
        if value is not None:
            given[o.name] = _list(o, value) if _is_list(o) else value
    return given


def _is_list(o: Option) -> bool:
    """A tuple option: argparse keeps the text, ``given_options`` splits it (a ConfigError, one line
    and exit 2 like every input error, when an item does not parse)."""
    return isinstance(o.default, tuple) and o.meta.type is None


def _list(o: Option, text: str) -> tuple:
    try:
        return o.parse(text)
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(type(o.default[0]) if o.default else str, "values")
        sep = {",": "comma", ":": "colon"}.get(o.meta.sep, repr(o.meta.sep))
        raise ConfigError(f"{o.flag} takes {sep}-separated {kind}, got '{text}'") from None


def _description(owner: type) -> str | None:
    doc = (owner.__doc__ or "").strip()
    return None if not doc or doc.startswith(owner.__name__ + "(") else doc.splitlines()[0]


def _add_option(group, o: Option, defaults: dict) -> None:
    text = o.meta.help + _defaults_text(o, defaults)
    kwargs = dict(dest=o.name, default=None, help=text.replace("%", "%%"))
    if o.is_bool:
        group.add_argument(o.flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    group.add_argument(o.flag, type=_type(o), choices=o.meta.choices, metavar=o.meta.metavar, **kwargs)


def _defaults_text(o: Option, defaults: dict) -> str:
    """' (default: X)', or ' (default: X; flap: Y)' when some users differ; '' for None."""
    shown = {u: o.show(v) for u, v in defaults.items() if v is not None}
    if not shown:
        return ""
    common, _ = Counter(shown.values()).most_common(1)[0]
    others = "; ".join(f"{u}: {v}" for u, v in shown.items() if v != common)
    return f" (default: {common}" + (f"; {others})" if others else ")")


def _type(o: Option):
    """argparse's ``type``: the field's own (int, float), so that a bad number is argparse's usual
    usage error; None (the text) for strings and tuples."""
    if o.meta.type is not None:
        return o.meta.type
    if isinstance(o.default, (int, float)) and not o.is_bool:
        return type(o.default)
    return None
