"""The structured driver: score, choose a structure, and cut a model in place.

    plan = prune_structured_(lm, make_pruner("flap", ratio=0.2), calib_ids)

A ``ChannelScoreMethod`` (FLAP, Wanda-sp, magnitude-sp) is scored layer by layer
through the sequential engine: with the uniform structure each layer is cut as
soon as it is scored (the next layer calibrates on the pruned one), with the
adaptive structure every layer is scored on the dense model first. A
``ModelScoreMethod`` (LLM-Pruner) gets one whole-model gradient pass, run here
on its ``gradient_request``. Either way the scores become removal counts
(methods/structured/search.py), then a ``StructurePlan`` (units.py, plan.py),
which surgery.py applies. ``methods.dispatch.run_method`` calls this for every
method that produces a plan.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from codeprune.calibration.engine import calibrate_layers
from codeprune.calibration.gradients import gradient_pass
from codeprune.calibration.stats import ChannelStats
from codeprune.methods.contract import Needs, check_inputs
from codeprune.methods.structured.base import (
    ChannelScoreMethod,
    LayerScores,
    ModelScoreMethod,
    StructuredMethod,
    scope_layers,
)
from codeprune.methods.structured.plan import StructurePlan, bias_storage, decoder_param_count
from codeprune.methods.structured.search import (
    adaptive_counts,
    build_plan,
    counting_plan,
    uniform_counts,
)
from codeprune.methods.structured.surgery import apply_layer_, apply_plan_
from codeprune.methods.structured.units import (
    head_unit_kind,
    layer_plan,
)


def _layer_scores(method: ChannelScoreMethod, adapter, layer, linears, stats) -> LayerScores:
    s = adapter.layer_sizes(layer)
    o_stats, d_stats = stats.get("o_proj"), stats.get("down_proj")
    att = method.channel_scores("attention", linears, o_stats).float()
    if method.config.attn_square:
        att = att.square()
    head = att.view(s["heads"], adapter.head_dim).mean(1)
    channel = method.channel_scores("mlp", linears, d_stats).float()
    return LayerScores(head, att, channel,
                       o_stats.mean if o_stats is not None else None,
                       d_stats.mean if d_stats is not None else None,
                       s["kv_heads"], s["heads"] // s["kv_heads"])


def _output_stats(name, linear):
    """The engine's accumulator factory: input moments of the two output projections only."""
    return ChannelStats(moments=True) if name in ("o_proj", "down_proj") else None


def prune_structured_(lm, method: StructuredMethod, input_ids: torch.Tensor | None, *, device="cpu",
                      offload: bool = False, batch_size: int = 8) -> StructurePlan:
    """Score, choose a structure, cut ``lm`` in place; returns the plan applied (the gradient
    pass of a ``ModelScoreMethod``, if any, is in ``plan.gradients``)."""
    cfg, a = method.config, lm.adapter
    check_inputs(method, input_ids, offload)
    first = a.layer_sizes(a.layers()[0])
    kind = head_unit_kind(cfg, first["heads"] // first["kv_heads"])
    layers = scope_layers(cfg.scope, a.num_layers)
    counts = uniform_counts(lm, cfg, kind) if cfg.structure == "uniform" else None
    grads = None
    if isinstance(method, ModelScoreMethod):  # every layer scored at once, on the dense model
        request = method.gradient_request(layers)
        if request is not None:
            grads = gradient_pass(lm, input_ids, device=device, **asdict(request))
        scores = method.model_scores(lm, grads, layers)
        if grads is not None:
            grads.grad, grads.fisher = {}, None  # the sums are spent: free them before surgery
            if not request.backward:
                grads = None  # a statistics-only pass (compensation means): no gradient pass to report
        plan, done = None, set()
    else:
        scores, plan, done = _score_layers(lm, method, input_ids, counts, kind, device=device,
                                           offload=offload, batch_size=batch_size)
    if counts is None:
        counts = adaptive_counts(lm, scores, cfg, kind)
        desired = round((1 - cfg.ratio) * decoder_param_count(a))
        excess = counting_plan(lm, counts, kind, cfg.compensation).param_count(lm)["decoder"] - desired
        if excess > 0:  # the compensation biases: remove that much more
            counts = adaptive_counts(lm, scores, cfg, kind, budget_shift=excess)
    if plan is None:
        plan = build_plan(lm, scores, counts, kind, cfg)
    plan.gradients = grads
    plan.notes.append(f"head unit: {kind}")
    if cfg.scope != (0.0, 1.0):
        plan.notes.append(f"layer scope {cfg.scope[0]:g}:{cfg.scope[1]:g}: layers {layers[0]}-{layers[-1]} "
                          f"of 0-{a.num_layers - 1} pruned")
    plan.planned_params = plan.param_count(lm)  # before the remaining surgery
    apply_plan_(lm, plan, layers_done=done)
    return plan


def _score_layers(lm, method: ChannelScoreMethod, input_ids, counts, kind: str, *, device, offload: bool,
                  batch_size: int):
    """Layer-by-layer scores (through the engine when the method needs data). With uniform
    ``counts`` each layer is cut as soon as it is scored: returns (scores, plan, layers cut);
    otherwise (scores, None, empty set) for the adaptive search."""
    cfg, a = method.config, lm.adapter
    scores: list[LayerScores | None] = [None] * a.num_layers
    plan = StructurePlan.dense(a) if counts is not None else None
    done: set[int] = set()
    gain = bias_storage(a, ["o_proj", "down_proj"] if cfg.compensation else [])[1]

    def on_layer(i, layer, linears, stats):
        scores[i] = sc = _layer_scores(method, a, layer, linears, stats)
        if counts is not None:
            plan.layers[i] = layer_plan(sc, linears, a.head_dim, kind, *counts[i], cfg.compensation)
            apply_layer_(a, layer, plan.layers[i], gain)
            done.add(i)

    if method.needs() is Needs.LAYER_STATS:
        calibrate_layers(lm, input_ids, make_stats=_output_stats, on_layer=on_layer, device=device,
                         offload=offload, batch_size=batch_size, desc=method.name)
    else:
        for i, layer in enumerate(a.layers()):
            on_layer(i, layer, a.linears(layer), {})
    return scores, plan, done
