"""Streaming statistics of a Linear's input, fed batch by batch by the engine's hooks.

Every accumulator has ``add_batch(x)`` with x of shape (..., in_features) and
allocates its buffers on the device and in the precision it chooses, lazily,
from the first batch (methods never move tensors themselves).
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Streaming per-input-channel statistics of a Linear's input.

    Holds the token count, the sum of x^2 (Wanda's ||X_j||^2) and mean / M2 merged
    batch by batch with Chan's parallel update (a numerically stable variance,
    used by FLAP's fluctuation metric). All in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.sumsq: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (T, in)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        sumsq_b = (x * x).sum(0)
        if self.count == 0:
            self.sumsq, self.mean, self.m2 = sumsq_b, mean_b, m2_b
        else:
            n = self.count + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
            self.sumsq = self.sumsq + sumsq_b
        self.count += n_b

    @property
    def l2(self) -> torch.Tensor:
        """||X_:,j||_2 over all tokens seen."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each channel over all tokens seen."""
        return self.m2 / self.count


class HessianStats:
    """H = 2/N * sum_n x_n x_n^T over all N tokens seen (float32, (in, in)): SparseGPT's Hessian."""

    def __init__(self) -> None:
        self.count = 0
        self.H: torch.Tensor | None = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (T, in)
        n_b = x.shape[0]
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        total = self.count + n_b
        self.H.mul_(self.count / total)  # keep H an average as batches stream in
        x = x * (2.0 / total) ** 0.5
        self.H.addmm_(x.T, x)
        self.count = total
