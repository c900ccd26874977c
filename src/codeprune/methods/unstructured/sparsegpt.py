"""SparseGPT (Frantar & Alistarh 2023): mask selection with an OBS weight update.

For each Linear, H = 2 X^T X / N + 1% damping. Work on the upper Cholesky factor
of H^-1 in blocks of 128 columns; inside a block choose the mask by
w^2 / [H^-1]_jj^2 (over the whole block for unstructured - the reference code's
adaptive mask selection - or per M columns of each row for N:M) and propagate
each pruned column's error (w - q) / d to the columns not yet visited.

    codeprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --out runs/sgpt50
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codeprune.calibration.stats import HessianStats
from codeprune.errors import ConfigError
from codeprune.methods.registry import register
from codeprune.methods.unstructured.base import PruneConfig, UnstructuredMethod
from codeprune.options import opt


@dataclass
class SparseGPTConfig(PruneConfig):
    block_size: int = opt(128, "columns solved together, as in the reference code")
    damp: float = opt(0.01, "fraction of mean(diag H) added to the Hessian's diagonal")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or not 0 < self.damp < 1:
            raise ConfigError("sparsegpt needs block_size >= 1 and 0 < damp < 1")


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, raising the damping if H is not positive definite."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * (10**attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
    raise RuntimeError("SparseGPT: Hessian is not positive definite even with 1e5x damping")


@torch.no_grad()
def sparsegpt_prune_(W: torch.Tensor, H: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Prune W (out, in) in place given H (in, in); returns the mask (True = pruned)."""
    W32 = W.float()
    H = H.clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: prune them for free
    H[dead, dead] = 1
    W32[:, dead] = 0
    Hinv = _inverse_cholesky(H, damp)  # (in, in), upper triangular
    out_f, in_f = W32.shape
    if nm is not None:
        if in_f % nm[1]:
            raise ConfigError(f"N:M pattern needs in_features divisible by M; {in_f} % {nm[1]} != 0")
        block_size = max(nm[1], block_size - block_size % nm[1])  # N:M groups never straddle blocks
    mask = torch.zeros_like(W32, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W32[:, i1:i2].clone()  # (out, B)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (B,)
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            k = int(W1.numel() * sparsity)
            if k:
                score = (W1**2 / d.unsqueeze(0) ** 2).flatten()
                mask1.view(-1)[torch.topk(score, k, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2  # (out, M)
                idx = torch.topk(score, nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            # OBS: remove the pruned weights of column i, push their error to later columns
            err = W1[:, i] * mask1[:, i] / d[i]  # (out,), zero where the weight is kept
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # column i becomes 0 where pruned
            Err1[:, i] = err
        W32[:, i1:i2] = W1
        W32[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
        mask[:, i1:i2] = mask1
    W32[mask] = 0
    W.copy_(W32)
    return mask


@register("sparsegpt")
class SparseGPTPruner(UnstructuredMethod):
    config_class = SparseGPTConfig

    def make_stats(self, name: str, linear: nn.Linear) -> HessianStats:
        return HessianStats()

    def prune_(self, name: str, linear: nn.Linear, stats: HessianStats) -> None:
        c = self.config
        sparsegpt_prune_(linear.weight.data, stats.H, c.sparsity, c.nm, c.block_size, c.damp)
