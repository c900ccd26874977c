"""Units of structured pruning and one layer's plan.

An FFN unit is one channel (row of gate/up, column of down). An attention unit,
under grouped-query attention, is one query head from every KV group (``query``)
or a whole KV group (``group``): ``head_unit_kind`` picks it, ``attention_units``
ranks the units of a layer by score, ``unit_weights`` counts their parameters from
the real shapes, and ``layer_plan`` removes the weakest ones (with the bias
compensation of the removed inputs' mean contribution).
"""

from __future__ import annotations

import torch
from torch import nn

from codeprune.errors import ConfigError
from codeprune.methods.structured.base import (
    LayerScores,
    StructuredConfig,
    aggregate,
)
from codeprune.methods.structured.plan import LayerPlan


def zscore(x: torch.Tensor) -> torch.Tensor:
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
