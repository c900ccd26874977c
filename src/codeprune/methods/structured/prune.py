"""prune."""

from __future__ import annotations

import torch

from codeprune.calibration.stats import ChannelStats
from codeprune.errors import ConfigError
from codeprune.methods.structured.base import (
    LayerScores,
    StructuredPruner,
    scope_layers,
)
from codeprune.methods.structured.plan import StructurePlan, bias_storage, decoder_param_count
from codeprune.methods.structured.search import (
    _build,
    _counting_plan,
    adaptive_counts,
    uniform_counts,
)
from codeprune.methods.structured.surgery import apply_layer_, apply_plan_
from codeprune.methods.structured.units import (
    head_unit_kind,
    layer_plan,
)


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
    from codeprune.calibration.engine import calibrate_layers

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
