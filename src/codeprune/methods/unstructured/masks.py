"""Pure mask functions: scores in, boolean masks out (True = pruned).

    >>> unstructured_mask(scores, 0.5)   # each row loses its int(in * 0.5) lowest scores
    >>> nm_mask(scores, 2, 4)            # each block of 4 columns in a row loses its 2 lowest
"""

from __future__ import annotations

import torch

from codeprune.errors import ConfigError


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, mark the ``int(in * sparsity)`` lowest scores (comparison group: a row)."""
    out_f, in_f = scores.shape
    k = int(in_f * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices  # (out, k)
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, for each block of ``m`` consecutive columns, mark the ``n`` lowest."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M pattern needs in_features divisible by M; {in_f} % {m} != 0")
    blocks = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M)
    idx = torch.topk(blocks, n, dim=2, largest=False, sorted=False).indices  # (out, in/M, N)
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity)
