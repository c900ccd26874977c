"""LLM-Pruner (Ma et al., NeurIPS 2023): Taylor importance of coupled structures.

Groups (the same units and GQA rules as FLAP, methods/structured/units.py):
- a query head h: rows h*d..(h+1)*d of q_proj (and its bias), columns of o_proj;
- a KV head g (removed with its whole group, ``--head-unit group``): rows of
  k_proj and v_proj (and biases);
- an FFN channel j: row j of gate_proj and up_proj, column j of down_proj.

Importance of one member (a slice of one weight) from the weight W, the gradient
g of the next-token loss (mean over the calibration samples) and the diagonal
Fisher F = mean over samples of g_n^2:

    element1  sum |W * g|                     first-order Taylor (default)
    element2  sum |W * g - 1/2 W * F * W|     with the second-order (Fisher) term
    vector    sum over the member's rows/columns of |sum_vector W * g|
              (one vector = one row or column, as LLM-Pruner's public code; the
              paper's wording, |sum over the whole member|, is coarser for heads)
    l2        sum W^2                          baseline, no data
    random    uniform random per member        baseline, no data (seeded)

A group's importance aggregates its members' importances (``aggregation``: sum by
default, mean, max, prod); a whole KV group is its query heads and its KV head.

Scope: layers round(start*L) <= i < round(end*L) (default 0.1:0.9; the paper keeps
layers 0-3 and 30-31 of LLaMA-7B whole). Budget: ``ratio`` of the decoder's
parameters, taken from the layers in the scope. Structures: ``uniform`` (every
layer in the scope loses the same share, the paper's setting; a scope narrower
than the whole depth gives a per-layer checkpoint, ``--scope 0:1`` a plain one)
and ``adaptive`` (all units pooled and ranked by importance per parameter, which
Taylor allows without standardising: the scores estimate the loss change on one
scale for every layer).

Gradients: one forward/backward per calibration sample, all weights frozen except
the Linears of the layers in the scope (no gradient memory for embeddings,
lm_head, norms); the structured driver runs it (``calibration.gradients.gradient_pass``) on the
method's ``gradient_request``. A post-accumulate hook folds
each gradient into float32 sums (g and, for element2, g^2) and frees it at once,
so at most one weight's gradient exists at a time; gradient checkpointing (on by
default) keeps one layer's activations instead of all of them. See ``GradientPass`` and docs/taylor.md for
the memory this needs.

    codeprune prune --model smollm2-135m --method taylor --importance element1 --ratio 0.2 \\
        --samples 16 --seq-len 128 --out runs/taylor20
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codeprune.calibration.gradients import GradientPass
from codeprune.errors import ConfigError
from codeprune.methods.contract import GradientRequest
from codeprune.methods.registry import register
from codeprune.methods.structured.base import (
    AGGREGATIONS,
    LayerScores,
    ModelScoreMethod,
    StructuredConfig,
    aggregate,
)
from codeprune.options import opt

IMPORTANCES = ("element1", "element2", "vector", "l2", "random")


GRADIENT_IMPORTANCES = ("element1", "element2", "vector")


ROW_MEMBERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the others are input columns


@dataclass
class TaylorConfig(StructuredConfig):
    importance: str = opt("element1", "element1 |W*g|, element2 (+ the Fisher term), vector, or the "
                          "baselines l2 and random", choices=IMPORTANCES)
    aggregation: str = opt("sum", "how a group combines its members' importances", choices=AGGREGATIONS)
    scope: tuple[float, float] | str = (0.1, 0.9)
    checkpointing: bool = opt(True, "activation checkpointing in the gradient pass (off: faster, more "
                              "memory)")
    seed: int = opt(0, "seed of the random importance baseline (a recipe stage key: prune's --seed is the "
                    "calibration windows')", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"unknown importance '{self.importance}': choose {', '.join(IMPORTANCES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation '{self.aggregation}': choose {', '.join(AGGREGATIONS)}")


def member_vectors(importance: str, W: torch.Tensor, g: torch.Tensor | None, F: torch.Tensor | None,
                   dim: int) -> torch.Tensor:
    """Importance of each vector of W along ``dim`` (dim=1: one value per row, 0: per column)."""
    W = W.float()
    if importance == "l2":
        return W.square().sum(dim)
    if importance == "element1":
        return (W * g).abs().sum(dim)
    if importance == "element2":
        return (W * g - 0.5 * W * F * W).abs().sum(dim)
    if importance == "vector":
        return (W * g).sum(dim).abs()
    raise ConfigError(f"importance '{importance}' has no per-element form")


@register("taylor")
class TaylorPruner(ModelScoreMethod):
    config_class = TaylorConfig

    def gradient_request(self, layers: list[int]) -> GradientRequest | None:
        cfg = self.config
        backward = cfg.importance in GRADIENT_IMPORTANCES
        if not backward and not cfg.compensation:
            return None  # l2 / random: the weights alone
        return GradientRequest(layers, second_order=cfg.importance == "element2",
                               checkpointing=cfg.checkpointing, input_stats=cfg.compensation,
                               backward=backward)

    def model_scores(self, lm, grads: GradientPass | None, layers: list[int]) -> list[LayerScores]:
        cfg, a = self.config, lm.adapter
        generator = torch.Generator().manual_seed(cfg.seed)
        scores = []
        for i, layer in enumerate(a.layers()):
            s = a.layer_sizes(layer)
            n_kv, n_rep = s["kv_heads"], s["heads"] // s["kv_heads"]
            if i not in layers:  # never pruned: placeholder scores
                scores.append(LayerScores(torch.zeros(s["heads"]), torch.zeros(0),
                                          torch.zeros(s["intermediate"]), None, None, n_kv, n_rep,
                                          torch.zeros(n_kv), cfg.aggregation, False))
                continue
            if cfg.importance == "random":
                head, kv, channel = (torch.rand(n, generator=generator, dtype=torch.float64)
                                     for n in (s["heads"], n_kv, s["intermediate"]))
            else:
                head, kv, channel = self._layer_importance(a, i, layer, grads)
            o_stats = grads.stats.get(f"{i}.o_proj") if grads is not None else None
            d_stats = grads.stats.get(f"{i}.down_proj") if grads is not None else None
            scores.append(LayerScores(head, torch.zeros(0), channel,
                                      o_stats.mean if o_stats is not None else None,
                                      d_stats.mean if d_stats is not None else None,
                                      n_kv, n_rep, kv, cfg.aggregation, False))
        return scores

    def _layer_importance(self, a, i: int, layer, grads: GradientPass | None):
        """(per query head, per KV head, per FFN channel) group importance of layer ``i``."""
        imp, hd = self.config.importance, a.head_dim
        per = {}
        for name, lin in a.linears(layer).items():
            dim = 1 if name in ROW_MEMBERS else 0
            W, b = lin.weight.detach(), lin.bias.detach() if lin.bias is not None else None
            g = grads.grad[f"{i}.{name}.weight"] if imp in GRADIENT_IMPORTANCES else None
            F = grads.fisher[f"{i}.{name}.weight"] if imp == "element2" else None
            v = member_vectors(imp, W, g, F, dim)
            if b is not None and dim == 1:  # a row's bias belongs to the row's structure
                gb = grads.grad[f"{i}.{name}.bias"] if imp in GRADIENT_IMPORTANCES else None
                Fb = grads.fisher[f"{i}.{name}.bias"] if imp == "element2" else None
                v = v + member_vectors(imp, b[:, None], None if gb is None else gb[:, None],
                                       None if Fb is None else Fb[:, None], 1)
            per[name] = v.double()
        head = aggregate(torch.stack([per["q_proj"].view(-1, hd).sum(1), per["o_proj"].view(-1, hd).sum(1)]),
                         self.config.aggregation)
        kv = aggregate(torch.stack([per["k_proj"].view(-1, hd).sum(1), per["v_proj"].view(-1, hd).sum(1)]),
                       self.config.aggregation)
        channel = aggregate(torch.stack([per["gate_proj"], per["up_proj"], per["down_proj"]]),
                            self.config.aggregation)
        return head, kv, channel
