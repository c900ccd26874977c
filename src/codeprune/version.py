"""The package version (read by ``codeprune --version`` and written into every report)."""

__version__ = "0.2.0"
