"""What every unstructured / N:M method shares: its config, its base class, its driver.

A method is one small module: a config dataclass validated in ``__post_init__``
and an ``UnstructuredMethod`` subclass (``produces = Produces.MASKS``, see
methods/contract.py) with two hooks the sequential engine calls per Linear:

    make_stats(name, linear) -> accumulator | None   input statistics it needs
    prune_(name, linear, stats)                       set the weights in place

``prune_model_`` runs them over every decoder layer (through the engine, or
directly for a method that ``needs()`` nothing). Register a method with
``@register("name")``; see docs/adding-a-method.md.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from codeprune.calibration.engine import calibrate_layers
from codeprune.errors import ConfigError
from codeprune.methods.contract import Method, Needs, Produces, check_inputs
from codeprune.options import opt


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4). Raises ConfigError otherwise."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern or "")
    if not match:
        raise ConfigError(f"bad pattern '{pattern}': use 'unstructured' or N:M such as 2:4")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ConfigError(f"bad N:M pattern '{pattern}': need 0 < N < M")
    return n, m


@dataclass
class PruneConfig:
    """Options shared by the unstructured / N:M methods."""

    sparsity: float = opt(0.5, "fraction of the weights of each pruned Linear set to zero")
    pattern: str = opt("unstructured", "unstructured, or N:M such as 2:4: N zeros in every M weights, the "
                       "sparsity then being N/M", metavar="unstructured|N:M")

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        if nm:
            self.sparsity = nm[0] / nm[1]
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class UnstructuredMethod(Method):
    """Base class of a method that masks each Linear of a decoder layer (same shapes)."""

    config_class: ClassVar[type[PruneConfig]] = PruneConfig
    produces = Produces.MASKS

    def needs(self) -> Needs:
        return Needs.LAYER_STATS

    def make_stats(self, name: str, linear: nn.Linear):
        """The accumulator ``prune_`` needs for ``linear``'s input (calibration/stats.py), or None."""
        return None

    @abstractmethod
    def prune_(self, name: str, linear: nn.Linear, stats) -> None:
        """Set ``linear``'s weights in place from ``stats`` (None when it asked for none)."""


@torch.no_grad()
def apply_mask_(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the weights where ``mask`` is True."""
    linear.weight.mul_(~mask)


def prune_model_(lm, pruner: UnstructuredMethod, input_ids: torch.Tensor | None, *, device="cpu",
                 offload: bool = False, batch_size: int = 8) -> list[nn.Linear]:
    """Prune every decoder-layer Linear of ``lm`` in place; returns the pruned Linears.

    Embeddings and lm_head are never pruned. Methods that need calibration run
    through the sequential engine; magnitude needs no data and no forward pass."""
    pruned: list[nn.Linear] = []

    def on_layer(index, layer, linears, stats):
        for name, linear in linears.items():
            pruner.prune_(name, linear, stats.get(name))
            pruned.append(linear)

    check_inputs(pruner, input_ids, offload)
    if pruner.needs() is Needs.NOTHING:
        for i, layer in enumerate(lm.adapter.layers()):
            on_layer(i, layer, lm.adapter.linears(layer), {})
        return pruned
    calibrate_layers(lm, input_ids, make_stats=pruner.make_stats, on_layer=on_layer,
                     device=device, offload=offload, batch_size=batch_size, desc=pruner.name)
    return pruned
