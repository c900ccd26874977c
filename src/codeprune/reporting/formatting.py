"""The one number formatter of codeprune's reports (report.md, compare.md, the runs table).

    fmt(0.123456)        -> "0.1235"     (floats: 4 significant digits)
    fmt(1234567)         -> "1,234,567"  (integers: thousands separators)
    fmt(True)            -> "yes"
    fmt(None)            -> ""           (an empty table cell)
    fmt(0.5, ".3f")      -> "0.500"      (an explicit format spec wins)
    megabytes(2**20)     -> "1.0 MB"     (sizes: MB of 2**20 bytes, as peak memory is measured)
"""

from __future__ import annotations


def fmt(value, spec: str | None = None) -> str:
    """``value`` as a table cell: see the module docstring."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec is not None:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def megabytes(n_bytes: int | float) -> str:
    """A size in MB (2**20 bytes), one decimal: the unit of every size in codeprune's reports."""
    return f"{n_bytes / 2**20:,.1f} MB"
