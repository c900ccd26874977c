"""Streaming statistics of a Linear's input, fed batch by batch by the engine's hooks.

Every accumulator has ``add_batch(x)`` with x of shape (..., in_features) and
allocates its buffers on the device and in the precision it chooses, lazily,
from the first batch (beside the batch: methods never place anything themselves).
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Streaming per-input-channel statistics of a Linear's input.

    Always: the token count and the sum of x^2 (Wanda's ||X_j||^2). With
    ``moments=True`` also the mean and M2, merged batch by batch with Chan's
    parallel update (a numerically stable variance, for FLAP's fluctuation
    metric). Each batch is reduced in float32, the running sums kept in float64."""

    def __init__(self, moments: bool = False) -> None:
        self.moments = moments
        self.count = 0
        self.sumsq: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (T, in)
        n_b = x.shape[0]
        sumsq_b = torch.linalg.vector_norm(x, dim=0).double().square()
        self.sumsq = sumsq_b if self.sumsq is None else self.sumsq + sumsq_b
        if self.moments:
            mean_f = x.mean(0)
            m2_b = torch.linalg.vector_norm(x - mean_f, dim=0).double().square()  # sum (x - mean_b)^2
            mean_b = mean_f.double()
            if self.count == 0:
                self.mean, self.m2 = mean_b, m2_b
            else:
                n = self.count + n_b
                delta = mean_b - self.mean
                self.mean = self.mean + delta * (n_b / n)
                self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count += n_b

    @property
    def l2(self) -> torch.Tensor:
        """||X_:,j||_2 over all tokens seen."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each channel over all tokens seen (needs moments=True)."""
        if not self.moments:
            raise ValueError("ChannelStats(moments=False) does not track the variance")
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
