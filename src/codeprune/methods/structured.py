"""What every structured method shares: units, structure search, budget, compensation.

A structured method scores the *input channels* of the two output projections:
o_proj (a head's head_dim channels) and down_proj (one FFN channel each). It
implements one function, ``channel_scores(module, linears, stats)``; this module
turns the scores into a ``structure.StructurePlan``:

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
  attention unit and its best channel (see structure.py, "Empty layers").
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

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..stats import ChannelStats
from ..structure import (
    LayerPlan,
    StructurePlan,
    apply_layer_,
    apply_plan_,
    bias_storage,
    decoder_param_count,
)

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

    ratio: float = 0.2  # fraction of decoder-layer parameters removed
    structure: str = "uniform"  # uniform (UL-UM) or adaptive (AL-AM)
    compensation: bool = False  # add the removed inputs' mean contribution as a bias
    head_unit: str = "auto"  # query, group, or auto (query under GQA, group otherwise)
    attn_square: bool = False  # square the head score (FLAP's public code)
    scope: tuple[float, float] | str = (0.0, 1.0)  # layers pruned, as fractions of depth
    units: str = "all"  # all: heads and FFN channels; ffn: FFN channels only; heads: attention only

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


class StructuredPruner(ABC):
    """Base class of a structured method: scores the inputs of o_proj and down_proj."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[StructuredConfig]] = StructuredConfig
    needs_calibration: ClassVar[bool] = True
    structured: ClassVar[bool] = True
    whole_model: ClassVar[bool] = False  # True: ``model_scores`` scores every layer at once

    def model_scores(self, lm, input_ids: torch.Tensor | None, *, device,
                     layers: list[int]) -> list[LayerScores]:
        """Scores of every layer of the dense model (methods with ``whole_model``; the layers
        outside ``layers`` are never pruned and may get placeholder scores)."""
        raise TypeError(f"{type(self).__name__} scores layer by layer (channel_scores)")

    def __init__(self, config: StructuredConfig):
        self.config = config

    @property
    def uses_calibration(self) -> bool:
        """Scores from data, or compensation means (even magnitude-sp needs data for those)."""
        return self.needs_calibration or self.config.compensation

    @abstractmethod
    def channel_scores(self, module: str, linears: dict[str, nn.Linear],
                       stats: ChannelStats | None) -> torch.Tensor:
        """Scores (higher = keep) of the input channels of o_proj (``module="attention"``) or
        down_proj (``"mlp"``); ``stats``: that projection's input statistics (mean/var/l2),
        None when the method needs no calibration."""


# -- units ----------------------------------------------------------------------

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


def _z(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def head_unit_kind(cfg: StructuredConfig, n_rep: int) -> str:
    if cfg.head_unit == "auto":
        return "query" if n_rep > 1 else "group"
    if cfg.head_unit == "query" and n_rep == 1:
        raise ConfigError("head unit 'query' needs grouped-query attention (several query heads per KV "
                          "head); this model has one query head per KV head: use 'group'")
    return cfg.head_unit


def attention_units(head_score: torch.Tensor, n_kv: int, n_rep: int, kind: str,
                    kv: torch.Tensor | None = None, agg: str = "mean"):
    """[(score, query heads, kv heads)] ascending by score (the first ones go first).

    A unit's score combines (``agg``) the scores of its query heads and, for a whole
    KV group with ``kv`` given, the KV head's score."""
    per_group = head_score.view(n_kv, n_rep)
    units = []
    if kind == "query":
        order = per_group.argsort(dim=1, stable=True)  # weakest first in each group
        for r in range(n_rep):
            heads = [g * n_rep + int(order[g, r]) for g in range(n_kv)]
            units.append((float(aggregate(head_score[heads], agg)), heads, [], r))
    else:
        for g in range(n_kv):
            members = per_group[g] if kv is None else torch.cat([per_group[g].double(), kv[g:g + 1].double()])
            units.append((float(aggregate(members, agg)), list(range(g * n_rep, (g + 1) * n_rep)), [g], 0))
    units.sort(key=lambda u: (u[0], u[3]))
    return [u[:3] for u in units]


def unit_weights(linears: dict[str, nn.Linear], head_dim: int, n_kv: int, n_rep: int,
                 kind: str) -> tuple[int, int]:
    """(parameters of one attention unit, of one FFN channel), from the real shapes."""
    hidden = linears["o_proj"].out_features
    bias = {n: int(lin.bias is not None) for n, lin in linears.items()}
    q_head = head_dim * (hidden + bias["q_proj"]) + hidden * head_dim
    kv_head = head_dim * (hidden + bias["k_proj"]) + head_dim * (hidden + bias["v_proj"])
    attn = n_kv * q_head if kind == "query" else n_rep * q_head + kv_head
    channel = (hidden + bias["gate_proj"]) + (hidden + bias["up_proj"]) + hidden
    return attn, channel


@torch.no_grad()
def layer_plan(scores: LayerScores, linears: dict[str, nn.Linear], head_dim: int, kind: str,
               n_units: int, n_channels: int, compensation: bool) -> LayerPlan:
    """Remove the ``n_units`` weakest attention units and ``n_channels`` weakest channels."""
    units = attention_units(scores.head, scores.n_kv, scores.n_rep, kind, scores.kv, scores.agg)
    gone_q = {h for _, q, _ in units[:n_units] for h in q}
    gone_kv = {g for _, _, kv in units[:n_units] for g in kv}
    n_heads, n_ff = scores.head.numel(), scores.channel.numel()
    ch_order = scores.channel.argsort(stable=True)
    gone_ch = sorted(int(c) for c in ch_order[:n_channels])
    lp = LayerPlan(kv_heads=[g for g in range(scores.n_kv) if g not in gone_kv],
                   q_heads=[h for h in range(n_heads) if h not in gone_q],
                   channels=sorted(set(range(n_ff)) - set(gone_ch)))
    if compensation and (n_units or n_channels):  # a layer that loses nothing needs no bias value
        if scores.o_mean is None or scores.down_mean is None:
            raise ConfigError("bias compensation needs calibration statistics")
        o_cols = [h * head_dim + d for h in sorted(gone_q) for d in range(head_dim)]
        lp.o_bias = _contribution(linears["o_proj"].weight, scores.o_mean, o_cols)
        lp.down_bias = _contribution(linears["down_proj"].weight, scores.down_mean, gone_ch)
    return lp


def _contribution(W: torch.Tensor, mean: torch.Tensor, cols: list[int]) -> torch.Tensor:
    """W[:, cols] @ mean[cols] (float64), zeros when nothing is removed."""
    if not cols:
        return torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    idx = torch.tensor(cols, dtype=torch.long, device=W.device)
    return W.index_select(1, idx).double() @ mean.to(W.device).double()[idx]


# -- structure search ---------------------------------------------------------------

def _counting_plan(lm, counts: list[tuple[int, int]], kind: str, compensation: bool) -> StructurePlan:
    """A plan with the given removal counts, for ``param_count``: which units go does not
    change the count, so no scores and no compensation values are computed."""
    a = lm.adapter
    plan = StructurePlan.dense(a)
    for i, ((n_u, n_c), layer) in enumerate(zip(counts, a.layers(), strict=True)):
        s = a.layer_sizes(layer)
        flat = LayerScores(torch.zeros(s["heads"]), torch.zeros(0), torch.zeros(s["intermediate"]),
                           None, None, s["kv_heads"], s["heads"] // s["kv_heads"])
        lp = plan.layers[i] = layer_plan(flat, a.linears(layer), a.head_dim, kind, n_u, n_c, False)
        if compensation and (n_u or n_c):
            lp.o_bias = lp.down_bias = torch.zeros(0)  # only their presence counts
    return plan


def uniform_counts(lm, cfg: StructuredConfig, kind: str) -> list[tuple[int, int]]:
    """(attention units, channels) removed per layer so that every layer in the scope loses
    the same share of its parameters (heads by that share, FFN channels making up the rest),
    ``ratio`` of the decoder's parameters in all; layers outside the scope lose nothing."""
    a = lm.adapter
    in_scope = set(scope_layers(cfg.scope, a.num_layers))
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in a.layers()]
    share = cfg.ratio * sum(sizes) / sum(sizes[i] for i in in_scope)
    if cfg.units == "ffn":  # the MLP alone carries the share
        mlp = sum(3 * a.hidden_size * a.layer_sizes(a.layers()[i])["intermediate"] for i in in_scope)
        if cfg.ratio * sum(sizes) >= 0.95 * mlp:
            raise ConfigError(f"ratio {cfg.ratio} of the decoder would remove over 95% of the FFN "
                              "channels in scope: lower the ratio, or prune heads too (--units all)")
    if cfg.units == "heads":  # attention alone carries the share
        attn = sum(sizes[i] - 3 * a.hidden_size * a.layer_sizes(a.layers()[i])["intermediate"]
                   for i in in_scope)
        if cfg.ratio * sum(sizes) >= 0.9 * attn:
            raise ConfigError(f"ratio {cfg.ratio} of the decoder is more than the attention in scope can "
                              "give: lower the ratio, or prune FFN channels too (--units all)")
    if share >= 0.95:
        raise ConfigError(f"ratio {cfg.ratio} of the decoder would remove {share:.0%} of every layer in "
                          f"the scope {cfg.scope[0]}:{cfg.scope[1]}: lower the ratio or widen the scope")
    counts = []
    for i, layer in enumerate(a.layers()):
        if i not in in_scope:
            counts.append((0, 0))
            continue
        s = a.layer_sizes(layer)
        n_kv, n_rep = s["kv_heads"], s["heads"] // s["kv_heads"]
        n_units = n_rep if kind == "query" else n_kv
        w_unit, w_ch = unit_weights(a.linears(layer), a.head_dim, n_kv, n_rep, kind)
        target = share * sizes[i]
        if cfg.units == "heads":
            n_u = min(max(round(target / w_unit), 0), n_units - 1)
            counts.append((n_u, 0))
            continue
        n_u = 0 if cfg.units == "ffn" else min(max(round(share * n_units), 0), n_units - 1)
        n_c = min(max(round((target - n_u * w_unit) / w_ch), 0), s["intermediate"] - 1)
        counts.append((n_u, n_c))
    if cfg.units == "heads":  # whole heads: no channel to absorb rounding
        return counts
    return _correct(lm, counts, cfg, kind, in_scope)


def _correct(lm, counts, cfg, kind, in_scope: set[int]) -> list[tuple[int, int]]:
    """Spread the parameters the compensation biases add (and rounding) over the channel
    counts of the layers in the scope."""
    a = lm.adapter
    decoder = decoder_param_count(a)
    planned = _counting_plan(lm, counts, kind, cfg.compensation).param_count(lm)["decoder"]
    excess = planned - round((1 - cfg.ratio) * decoder)  # > 0: remove a little more
    out = []
    for i, ((n_u, n_c), layer) in enumerate(zip(counts, a.layers(), strict=True)):
        if i not in in_scope:
            out.append((n_u, n_c))
            continue
        s = a.layer_sizes(layer)
        w_ch = unit_weights(a.linears(layer), a.head_dim, s["kv_heads"], s["heads"] // s["kv_heads"], kind)[1]
        extra = round(excess / len(in_scope) / w_ch)
        out.append((n_u, min(max(n_c + extra, 0), s["intermediate"] - 1)))
    return out


def adaptive_counts(lm, scores: list[LayerScores], cfg: StructuredConfig, kind: str,
                    budget_shift: int = 0) -> list[tuple[int, int]]:
    """AL-AM: pool the unit scores of every layer in the scope and remove the weakest until
    ``ratio`` of the decoder parameters (plus ``budget_shift``) is gone.

    Scores on per-layer scales (FLAP's fluctuation) are standardised within each layer
    and module first; scores on one scale across the model (``standardise=False``,
    Taylor's loss estimates) are compared raw, per parameter removed."""
    a = lm.adapter
    in_scope = set(scope_layers(cfg.scope, a.num_layers))
    pool = []  # (score, weight, layer, "attn" | "mlp")
    for i, (layer, sc) in enumerate(zip(a.layers(), scores, strict=True)):
        if i not in in_scope:
            continue
        w_unit, w_ch = unit_weights(a.linears(layer), a.head_dim, sc.n_kv, sc.n_rep, kind)
        if sc.standardise:
            head_z = _z(sc.head_channels).view(len(sc.head), -1).mean(1)  # FLAP: standardise, then mean
            units = attention_units(head_z, sc.n_kv, sc.n_rep, kind)
            if cfg.units != "ffn":
                pool += [(u[0], w_unit, i, "attn") for u in units[:-1]]  # the best unit always stays
            if cfg.units != "heads":
                z = _z(sc.channel).sort().values
                pool += [(float(v), w_ch, i, "mlp") for v in z[:-1].tolist()]
        else:
            units = attention_units(sc.head, sc.n_kv, sc.n_rep, kind, sc.kv, sc.agg)
            if cfg.units != "ffn":
                pool += [(u[0] / w_unit, w_unit, i, "attn") for u in units[:-1]]
            if cfg.units != "heads":
                per_param = (sc.channel.double() / w_ch).sort().values
                pool += [(float(v), w_ch, i, "mlp") for v in per_param[:-1].tolist()]
    pool.sort(key=lambda p: p[0])
    target = cfg.ratio * decoder_param_count(a) + budget_shift
    removed, counts = 0, [[0, 0] for _ in scores]
    for _, w, i, kind_ in pool:
        if removed + w > target:
            if kind_ == "attn" and cfg.units != "heads":
                continue  # a large unit that would overshoot: a channel may still fit
            break
        removed += w
        counts[i][0 if kind_ == "attn" else 1] += 1
    return [tuple(c) for c in counts]


# -- the driver --------------------------------------------------------------------

def _layer_scores(pruner: StructuredPruner, adapter, layer, linears, stats) -> LayerScores:
    s = adapter.layer_sizes(layer)
    o_stats, d_stats = stats.get("o_proj"), stats.get("down_proj")
    att = pruner.channel_scores("attention", linears, o_stats if pruner.needs_calibration else None).float()
    if pruner.config.attn_square:
        att = att.square()
    head = att.view(s["heads"], adapter.head_dim).mean(1)
    channel = pruner.channel_scores("mlp", linears, d_stats if pruner.needs_calibration else None).float()
    return LayerScores(head, att, channel,
                       o_stats.mean if o_stats is not None else None,
                       d_stats.mean if d_stats is not None else None,
                       s["kv_heads"], s["heads"] // s["kv_heads"])


def check_offload(pruner: StructuredPruner, offload: bool) -> None:
    """Whole-model methods back-propagate through every layer at once: no --offload."""
    if offload and pruner.whole_model:
        raise ConfigError(f"'{pruner.name}' back-propagates through the whole model, which must fit "
                          "on the device: drop --offload")


def prune_structured_(lm, pruner: StructuredPruner, input_ids: torch.Tensor | None, *, device="cpu",
                      offload: bool = False, batch_size: int = 8) -> StructurePlan:
    """Score, choose a structure, cut ``lm`` in place; returns the plan applied."""
    from ..engine import calibrate_layers

    cfg, a = pruner.config, lm.adapter
    first = a.layer_sizes(a.layers()[0])
    kind = head_unit_kind(cfg, first["heads"] // first["kv_heads"])
    plan = StructurePlan.dense(a)
    done: set[int] = set()
    scores: list[LayerScores | None] = [None] * a.num_layers
    counts = uniform_counts(lm, cfg, kind) if cfg.structure == "uniform" else None
    gain = bias_storage(a, ["o_proj", "down_proj"] if cfg.compensation else [])[1]

    def make_stats(name, linear):
        return ChannelStats(moments=True) if name in ("o_proj", "down_proj") else None

    def on_layer(i, layer, linears, stats):
        sc = _layer_scores(pruner, a, layer, linears, stats)
        if counts is None:
            scores[i] = sc
            return
        plan.layers[i] = layer_plan(sc, linears, a.head_dim, kind, *counts[i], cfg.compensation)
        apply_layer_(a, layer, plan.layers[i], gain)
        done.add(i)

    check_offload(pruner, offload)
    if pruner.whole_model:  # scores of the dense model from one pass over all layers (gradients)
        if pruner.uses_calibration and input_ids is None:
            raise ConfigError(f"method '{pruner.name}' needs calibration data")
        scores = pruner.model_scores(lm, input_ids, device=device,
                                     layers=scope_layers(cfg.scope, a.num_layers))
    elif pruner.uses_calibration:
        if input_ids is None:
            raise ConfigError(f"method '{pruner.name}' needs calibration data")
        calibrate_layers(lm, input_ids, make_stats=make_stats, on_layer=on_layer, device=device,
                         offload=offload, batch_size=batch_size, desc=pruner.name)
    else:
        for i, layer in enumerate(a.layers()):
            on_layer(i, layer, a.linears(layer), {})
    if pruner.whole_model and counts is not None:
        plan = _build(lm, scores, counts, kind, cfg)
    elif counts is None:
        counts = adaptive_counts(lm, scores, cfg, kind)
        desired = round((1 - cfg.ratio) * decoder_param_count(a))
        excess = _counting_plan(lm, counts, kind, cfg.compensation).param_count(lm)["decoder"] - desired
        if excess > 0:  # the compensation biases: remove that much more
            counts = adaptive_counts(lm, scores, cfg, kind, budget_shift=excess)
        plan = _build(lm, scores, counts, kind, cfg)
    plan.notes.append(f"head unit: {kind}")
    if cfg.scope != (0.0, 1.0):
        layers = scope_layers(cfg.scope, a.num_layers)
        plan.notes.append(f"layer scope {cfg.scope[0]:g}:{cfg.scope[1]:g}: layers {layers[0]}-{layers[-1]} "
                          f"of 0-{a.num_layers - 1} pruned")
    plan.planned_params = plan.param_count(lm)  # before the remaining surgery
    apply_plan_(lm, plan, layers_done=done)
    return plan


def _build(lm, scores, counts, kind, cfg) -> StructurePlan:
    a = lm.adapter
    plan = StructurePlan.dense(a)
    plan.layers = [layer_plan(sc, a.linears(layer), a.head_dim, kind, n_u, n_c, cfg.compensation)
                   for sc, layer, (n_u, n_c) in zip(scores, a.layers(), counts, strict=True)]
    return plan

