"""Wanda (Sun et al. 2023): score |W_ij| * ||X_:,j||_2, compared within each output row.

No weight update; statistics are the streamed sum of x_j^2 of each Linear's input,
collected by the sequential engine on the outputs of the already-pruned layers.

    codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50
    codeprune prune --model smollm2-135m --method wanda --pattern 2:4 --out runs/wanda24
"""

from __future__ import annotations

import torch
from torch import nn

from codeprune.calibration.stats import ChannelStats
from codeprune.methods.registry import register
from codeprune.methods.unstructured.base import UnstructuredMethod, apply_mask_
from codeprune.methods.unstructured.masks import select_mask


def wanda_scores(W: torch.Tensor, x_l2: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: W (out, in), x_l2 (in,) -> (out, in)."""
    return W.abs() * x_l2.to(W.dtype).unsqueeze(0)


@register("wanda")
class WandaPruner(UnstructuredMethod):
    def make_stats(self, name: str, linear: nn.Linear) -> ChannelStats:
        return ChannelStats()

    def prune_(self, name: str, linear: nn.Linear, stats: ChannelStats) -> None:
        scores = wanda_scores(linear.weight.float(), stats.l2.float())
        apply_mask_(linear, select_mask(scores, self.config.sparsity, self.config.nm))
