"""What every structured method shares: units, structure search, budget, compensation.

A structured method scores the *input channels* of the two output projections:
o_proj (a head's head_dim channels) and down_proj (one FFN channel each). A
``ChannelScoreMethod`` implements one function, ``channel_scores(module, linears,
stats)``; a ``ModelScoreMethod`` scores every layer at once from a gradient pass.
This module holds their base classes, the shared options and the scope; the
driver (prune.py, with units.py, search.py and plan.py) turns the scores into a
``plan.StructurePlan``:

- Units. FFN: one channel (row of gate/up, column of down). Attention, under
  grouped-query attention (``head_unit``):
  ``query`` - one query head from every KV group at once (the r-th weakest of
  each group), so every group keeps the same count; KV heads stay. The default
  when a KV head serves several query heads.
  ``group`` - a KV head with all its query heads (q/k/v rows, o columns); the
  default (and the only choice) for multi-head attention.
- Scores. A head's score is the mean of its channel scores (optionally squared,
  as FLAP's public code does: ``attn_square``). With the adaptive structure the
  channel scores are standardised within each layer and module,
  z = (s - mean) / std (o_proj's input channels, down_proj's input channels); a
  head scores the mean z of its channels, a unit the mean over its heads.
- Structure. ``uniform`` (UL-UM): every layer loses the same share of heads and
  channels. ``adaptive`` (AL-AM): all units of the model are pooled and the
  lowest-scoring removed until the budget is met; each layer keeps its best
  attention unit and its best channel (see plan.py, "Empty layers").
- Budget. ``ratio`` is the fraction of decoder-layer parameters removed (norms
  and biases included; embeddings and lm_head never change); unit weights come
  from the real shapes. Added compensation biases are counted, and one
  correction pass brings the achieved ratio within a unit of the target.
- Compensation. For each layer, the removed inputs' mean contribution is added
  to the output projection's bias: b = W[:, removed] @ mean(X[:, removed]).

Uniform plans prune each layer as soon as it is scored (the next layer is
calibrated on the pruned one, as Wanda does); adaptive plans score every layer
on the dense model first, then cut.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from codeprune.calibration.gradients import GradientPass
from codeprune.calibration.stats import ChannelStats
from codeprune.errors import ConfigError
from codeprune.methods.contract import GradientRequest, Method, Needs, Produces
from codeprune.options import opt

STRUCTURES = ("uniform", "adaptive")


HEAD_UNITS = ("auto", "query", "group")


UNITS = ("all", "ffn", "heads")


AGGREGATIONS = ("sum", "mean", "max", "prod")


def parse_scope(scope) -> tuple[float, float]:
    """``"0.1:0.9"`` or (0.1, 0.9) -> (start, end) fractions of depth; ConfigError otherwise."""
    if isinstance(scope, str):
        try:
            scope = tuple(float(p) for p in scope.split(":"))
        except ValueError:
            scope = ()
    if (not isinstance(scope, (tuple, list)) or len(scope) != 2
            or not all(isinstance(x, (int, float)) for x in scope) or not 0 <= scope[0] < scope[1] <= 1):
        raise ConfigError(f"bad layer scope {scope!r}: give START:END as fractions of depth with "
                          "0 <= START < END <= 1, e.g. 0.1:0.9")
    return float(scope[0]), float(scope[1])


def scope_layers(scope: tuple[float, float], n_layers: int) -> list[int]:
    """Indices of the layers a method may prune: round(start * L) <= i < round(end * L)
    (LLM-Pruner keeps the first and last layers whole)."""
    first, last = round(scope[0] * n_layers), round(scope[1] * n_layers)
    if last <= first:
        raise ConfigError(f"layer scope {scope[0]}:{scope[1]} selects no layer of {n_layers}")
    return list(range(first, last))


def aggregate(members: torch.Tensor, agg: str) -> torch.Tensor:
    """Combine member importances stacked on dim 0 (LLM-Pruner's group reduction)."""
    members = members.double()
    if agg == "sum":
        return members.sum(0)
    if agg == "mean":
        return members.mean(0)
    if agg == "max":
        return members.amax(0)
    if agg == "prod":
        return members.prod(0)
    raise ConfigError(f"unknown aggregation '{agg}': choose {', '.join(AGGREGATIONS)}")


@dataclass
class StructuredConfig:
    """Options shared by the structured methods."""

    ratio: float = opt(0.2, "fraction of decoder-layer parameters removed; the report also gives the "
                       "fraction of all parameters")
    structure: str = opt("uniform", "uniform: the same share in every layer (UL-UM, a plain checkpoint); "
                         "adaptive: units pooled over the model, per-layer sizes (AL-AM)", choices=STRUCTURES)
    compensation: bool = opt(False, "bias compensation: add the removed inputs' mean contribution to the "
                             "output projection's bias")
    head_unit: str = opt("auto", "attention unit under GQA: one query head per KV group (query) or a whole "
                         "KV group (group); auto: query under GQA, group otherwise", choices=HEAD_UNITS)
    attn_square: bool = opt(False, "square the head score, as FLAP's public code")
    scope: tuple[float, float] | str = opt((0.0, 1.0), "layers pruned, as fractions of depth", type=str,
                                           sep=":", metavar="START:END")
    units: str = opt("all", "what is removed: heads and FFN channels (all), FFN channels only (ffn; with "
                     "structure uniform every layer keeps the same width: a plain checkpoint) or attention "
                     "heads only (heads)", choices=UNITS)

    def __post_init__(self) -> None:
        self.scope = parse_scope(self.scope)
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown structure '{self.structure}': choose {' or '.join(STRUCTURES)}")
        if self.units not in UNITS:
            raise ConfigError(f"unknown units '{self.units}': choose {', '.join(UNITS)}")
        if self.head_unit not in HEAD_UNITS:
            raise ConfigError(f"unknown head unit '{self.head_unit}': choose {', '.join(HEAD_UNITS)}")


class StructuredMethod(Method):
    """Base class of a structured method: it scores attention units and FFN channels, and the
    driver (methods/structured/prune.py) turns the scores into a plan (``produces = PLAN``).

    Subclass ``ChannelScoreMethod`` (scores from one layer's weights and input statistics, run
    layer by layer: FLAP, Wanda-sp, magnitude-sp) or ``ModelScoreMethod`` (scores of every
    layer at once from a whole-model gradient pass: LLM-Pruner)."""

    config_class: ClassVar[type[StructuredConfig]] = StructuredConfig
    produces = Produces.PLAN


class ChannelScoreMethod(StructuredMethod):
    """Scores the input channels of o_proj (a head's channels) and down_proj, layer by layer."""

    scores_from_data: ClassVar[bool] = True  # False: the weights alone (magnitude-sp)

    def needs(self) -> Needs:
        """Statistics for the scores, or for the compensation means (even magnitude-sp needs them)."""
        data = self.scores_from_data or self.config.compensation
        return Needs.LAYER_STATS if data else Needs.NOTHING

    @abstractmethod
    def channel_scores(self, module: str, linears: dict[str, nn.Linear],
                       stats: ChannelStats | None) -> torch.Tensor:
        """Scores (higher = keep) of the input channels of o_proj (``module="attention"``) or
        down_proj (``"mlp"``); ``stats``: that projection's input statistics (mean/var/l2),
        None when none were collected."""


class ModelScoreMethod(StructuredMethod):
    """Scores every layer of the dense model at once, from one whole-model gradient pass that
    the driver runs on the method's ``gradient_request`` (calibration/gradients.py)."""

    @abstractmethod
    def gradient_request(self, layers: list[int]) -> GradientRequest | None:
        """The pass this configured method needs over ``layers`` (None: the weights alone)."""

    def needs(self) -> Needs:
        return Needs.NOTHING if self.gradient_request([]) is None else Needs.GRADIENTS

    @abstractmethod
    def model_scores(self, lm, grads: GradientPass | None, layers: list[int]) -> list[LayerScores]:
        """Scores of every layer (the layers outside ``layers`` are never pruned and may get
        placeholder scores); ``grads`` is the pass asked for, or None."""


@dataclass
class LayerScores:
    """One layer's scores and what compensation needs."""

    head: torch.Tensor  # (heads,) mean of the head's channel scores
    head_channels: torch.Tensor  # (heads * head_dim,) the channel scores of o_proj's input
    channel: torch.Tensor  # (intermediate,)
    o_mean: torch.Tensor | None  # (heads * head_dim,) mean input of o_proj
    down_mean: torch.Tensor | None  # (intermediate,)
    n_kv: int
    n_rep: int
    kv: torch.Tensor | None = None  # (kv heads,) importance of the k/v rows, when the method scores them
    agg: str = "mean"  # how a unit combines its heads' (and KV head's) scores
    standardise: bool = True  # False: scores share one scale across layers (Taylor's loss estimates)
