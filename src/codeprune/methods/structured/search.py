"""How many attention units and FFN channels each layer loses.

``uniform_counts``: every layer in the scope loses the same share of its
parameters (FLAP's UL-UM, LLM-Pruner's setting). ``adaptive_counts``: all units
of the model are pooled and the weakest removed until the budget is met (FLAP's
AL-AM; scores standardised per layer and module, or compared per parameter for
Taylor's loss estimates). Counts are checked against the budget with a plan that
only counts parameters (``counting_plan``); ``build_plan`` turns counts and scores into
the plan.

``reach`` says, from the model's shapes alone (no data), the largest ratio a
configuration can remove: every layer in the scope keeps its best attention unit
and its best FFN channel (units.py), the layers outside the scope and the units
``units`` excludes stay whole, the compensation biases count, and the uniform
structure refuses to take 95% of a layer (90% of the attention for heads only).
``check_reachable`` refuses a ratio above it before any calibration:

    codeprune prune --model smollm2-135m --method flap --ratio 0.99   # exit 2: at most 0.874
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from codeprune.errors import ConfigError
from codeprune.methods.structured.base import (
    LayerScores,
    StructuredConfig,
    scope_layers,
)
from codeprune.methods.structured.plan import StructurePlan, decoder_param_count
from codeprune.methods.structured.units import (
    attention_units,
    head_unit_kind,
    layer_plan,
    unit_weights,
    zscore,
)


def counting_plan(lm, counts: list[tuple[int, int]], kind: str, compensation: bool) -> StructurePlan:
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
    limit, _ = uniform_limit(lm, cfg)
    if cfg.ratio * sum(sizes) >= limit:
        raise ConfigError(uniform_refusal(cfg, share))
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


def uniform_limit(lm, cfg: StructuredConfig) -> tuple[float, str]:
    """(parameters the uniform structure refuses to reach, why): 95% of the layers in the
    scope; with ``units`` ffn 95% of their FFN weights, with heads 90% of their attention."""
    a = lm.adapter
    in_scope = scope_layers(cfg.scope, a.num_layers)
    sizes = {i: sum(p.numel() for p in a.layers()[i].parameters()) for i in in_scope}
    mlp = {i: 3 * a.hidden_size * a.layer_sizes(a.layers()[i])["intermediate"] for i in in_scope}
    if cfg.units == "ffn":  # the MLP alone carries the share
        return 0.95 * sum(mlp.values()), "the uniform structure removes under 95% of the FFN channels"
    if cfg.units == "heads":  # attention alone carries the share
        return 0.9 * sum(sizes[i] - mlp[i] for i in in_scope), "the uniform structure removes under 90% " \
            "of the attention"
    return 0.95 * sum(sizes.values()), "the uniform structure removes under 95% of each layer"


def uniform_refusal(cfg: StructuredConfig, share: float) -> str:
    if cfg.units == "ffn":
        return (f"ratio {cfg.ratio} of the decoder would remove over 95% of the FFN channels in scope: "
                "lower the ratio, or prune heads too (--units all)")
    if cfg.units == "heads":
        return (f"ratio {cfg.ratio} of the decoder is more than the attention in scope can give: lower "
                "the ratio, or prune FFN channels too (--units all)")
    return (f"ratio {cfg.ratio} of the decoder would remove {share:.0%} of every layer in the scope "
            f"{cfg.scope[0]}:{cfg.scope[1]}: lower the ratio or widen the scope")


def _correct(lm, counts, cfg, kind, in_scope: set[int]) -> list[tuple[int, int]]:
    """Spread the parameters the compensation biases add (and rounding) over the channel
    counts of the layers in the scope."""
    a = lm.adapter
    decoder = decoder_param_count(a)
    planned = counting_plan(lm, counts, kind, cfg.compensation).param_count(lm)["decoder"]
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
            head_z = zscore(sc.head_channels).view(len(sc.head), -1).mean(1)  # FLAP: standardise, then mean
            units = attention_units(head_z, sc.n_kv, sc.n_rep, kind)
            if cfg.units != "ffn":
                pool += [(u[0], w_unit, i, "attn") for u in units[:-1]]  # the best unit always stays
            if cfg.units != "heads":
                z = zscore(sc.channel).sort().values
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


def build_plan(lm, scores, counts, kind, cfg) -> StructurePlan:
    a = lm.adapter
    plan = StructurePlan.dense(a)
    plan.layers = [layer_plan(sc, a.linears(layer), a.head_dim, kind, n_u, n_c, cfg.compensation)
                   for sc, layer, (n_u, n_c) in zip(scores, a.layers(), counts, strict=True)]
    return plan


@dataclass
class Reach:
    """How much of the decoder a structured configuration can remove at most."""

    removable: float  # parameters
    decoder: int  # the decoder's parameters now
    why: str  # the constraints, in words
    in_scope: int  # layers the configuration may prune

    @property
    def ratio(self) -> float:
        return self.removable / self.decoder


def max_counts(lm, cfg: StructuredConfig, kind: str) -> list[tuple[int, int]]:
    """The most (attention units, channels) each layer can lose: all but one of each in the
    scope (none of the kind ``units`` excludes), nothing outside it."""
    a = lm.adapter
    in_scope = set(scope_layers(cfg.scope, a.num_layers))
    counts = []
    for i, layer in enumerate(a.layers()):
        s = a.layer_sizes(layer)
        n_units = s["heads"] // s["kv_heads"] if kind == "query" else s["kv_heads"]
        heads = n_units - 1 if i in in_scope and cfg.units != "ffn" else 0
        channels = s["intermediate"] - 1 if i in in_scope and cfg.units != "heads" else 0
        counts.append((heads, channels))
    return counts


def reach(lm, cfg: StructuredConfig) -> Reach:
    """The largest number of decoder parameters ``cfg`` can remove from ``lm`` (from the shapes
    alone), and why no more."""
    a = lm.adapter
    first = a.layer_sizes(a.layers()[0])
    kind = head_unit_kind(cfg, first["heads"] // first["kv_heads"])
    decoder = decoder_param_count(a)
    kept = counting_plan(lm, max_counts(lm, cfg, kind), kind, cfg.compensation).param_count(lm)["decoder"]
    removable, why = float(decoder - kept), _constraints(cfg, kind)
    if cfg.structure == "uniform":
        limit, reason = uniform_limit(lm, cfg)
        if limit <= removable:
            removable, why = limit * (1 - 1e-9), reason + _scope_words(cfg)
    return Reach(removable, decoder, why, len(scope_layers(cfg.scope, a.num_layers)))


def _constraints(cfg: StructuredConfig, kind: str) -> str:
    head = "one query head per KV group" if kind == "query" else "one KV group"
    keeps = {"all": f"at least {head} and one FFN channel",
             "ffn": "its attention (units ffn) and at least one FFN channel",
             "heads": f"its FFN channels (units heads) and at least {head}"}[cfg.units]
    outside = ", the layers outside it stay whole" if cfg.scope != (0.0, 1.0) else ""
    biases = " (the compensation biases it adds count)" if cfg.compensation else ""
    return f"every layer{_scope_words(cfg)} keeps {keeps}{outside}{biases}"


def _scope_words(cfg: StructuredConfig) -> str:
    return "" if cfg.scope == (0.0, 1.0) else f" in the scope {cfg.scope[0]:g}:{cfg.scope[1]:g}"


def floor3(x: float) -> float:
    """``x`` rounded down to 3 decimals: a bound that is itself reachable when printed."""
    return math.floor(x * 1000 + 1e-9) / 1000


def check_reachable(lm, method) -> None:
    """ConfigError, before any data is read, when ``method``'s ratio is beyond ``reach``."""
    r = reach(lm, method.config)
    if method.config.ratio > r.ratio:
        raise ConfigError(f"ratio {method.config.ratio:g} cannot be reached by {method.name} on {lm.name}: "
                          f"{r.why}, so at most {floor3(r.ratio):.3f} of the decoder-layer parameters can "
                          "be removed")
