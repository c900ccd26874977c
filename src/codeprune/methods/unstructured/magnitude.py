"""Magnitude pruning: score |W_ij|, no calibration data. The baseline of every paper."""

from __future__ import annotations

from torch import nn

from codeprune.methods.contract import Needs
from codeprune.methods.registry import register
from codeprune.methods.unstructured.base import UnstructuredMethod, apply_mask_
from codeprune.methods.unstructured.masks import select_mask


def magnitude_scores(W):
    return W.abs()


@register("magnitude")
class MagnitudePruner(UnstructuredMethod):
    def needs(self) -> Needs:
        return Needs.NOTHING  # the weights alone

    def prune_(self, name: str, linear: nn.Linear, stats) -> None:
        scores = magnitude_scores(linear.weight.float())
        apply_mask_(linear, select_mask(scores, self.config.sparsity, self.config.nm))
