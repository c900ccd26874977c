"""Surgery: the one place that changes shapes and the config of a structurally pruned model.

``apply_plan_`` slices every layer to its ``LayerPlan`` (q/k/v rows, o columns,
gate/up rows, down columns; kept query heads laid out group by group so GQA's
mapping holds), adds the compensation biases, and writes the new sizes into the
config: the family's vanilla fields when every layer has the same size, else
``per_layer_config`` plus ``auto_map`` to the modeling file (models/checkpoint.py).
Depth (methods/depth.py) and vocabulary (methods/vocab.py) have their own surgery.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from codeprune.methods.structured.plan import LayerPlan, StructurePlan
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.checkpoint import EXTRA_BIAS_KEY, set_auto_map

logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)


PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of ``units`` blocks of ``size`` rows each."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    base = torch.tensor(units, dtype=torch.long).unsqueeze(1) * size
    return (base + torch.arange(size)).reshape(-1)


@torch.no_grad()
def _keep_outputs_(linear: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, idx),
                                 requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, idx),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features = len(idx)


@torch.no_grad()
def _keep_inputs_(linear: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(1, idx),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = len(idx)


@torch.no_grad()
def _add_bias_(linear: nn.Linear, value: torch.Tensor | None) -> None:
    """Give ``linear`` a bias if it has none (zeros), then add ``value`` to it."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
    if value is not None:
        linear.bias.add_(value.to(linear.bias.device, linear.bias.dtype))


def ordered_q_heads(lp: LayerPlan, n_rep: int) -> list[int]:
    """Kept query heads sorted group by group (the order surgery lays them out in)."""
    return sorted(lp.q_heads, key=lambda h: (lp.kv_heads.index(h // n_rep), h))


@torch.no_grad()
def apply_layer_(adapter: DecoderAdapter, layer: nn.Module, lp: LayerPlan,
                 gain: set[str] = frozenset()) -> None:
    """Slice one layer to ``lp`` (q/k/v rows, o columns, gate/up rows, down columns) and add
    its compensation biases; ``gain``: sublayers that get a bias (zeros unless compensated)."""
    s = adapter.layer_sizes(layer)
    n_rep, hd = s["heads"] // s["kv_heads"], adapter.head_dim
    lp.kv_heads = sorted(lp.kv_heads)
    lp.q_heads = ordered_q_heads(lp, n_rep)
    lp.channels = sorted(lp.channels)
    lin = adapter.linears(layer)
    q_rows, kv_rows = _rows(lp.q_heads, hd), _rows(lp.kv_heads, hd)
    ch = torch.tensor(lp.channels, dtype=torch.long)
    _keep_outputs_(lin["q_proj"], q_rows)
    _keep_outputs_(lin["k_proj"], kv_rows)
    _keep_outputs_(lin["v_proj"], kv_rows)
    _keep_inputs_(lin["o_proj"], q_rows)
    _keep_outputs_(lin["gate_proj"], ch)
    _keep_outputs_(lin["up_proj"], ch)
    _keep_inputs_(lin["down_proj"], ch)
    adapter.attention_module(layer).num_key_value_groups = len(lp.q_heads) // len(lp.kv_heads)
    for name in gain:
        _add_bias_(lin[name], None)
    if lp.o_bias is not None:
        _add_bias_(lin["o_proj"], lp.o_bias)
    if lp.down_bias is not None:
        _add_bias_(lin["down_proj"], lp.down_bias)


def apply_plan_(lm, plan: StructurePlan, *, layers_done: set[int] = frozenset()) -> None:
    """Apply ``plan`` to ``lm`` in place: slice every layer (except ``layers_done``, already
    sliced by a method that prunes as it calibrates), add biases, update the config."""
    a = lm.adapter
    plan.validate(a, skip=layers_done)
    flags, gain, extra = plan.new_biases(a)
    for i, (layer, lp) in enumerate(zip(a.layers(), plan.layers, strict=True)):
        if i not in layers_done:
            apply_layer_(a, layer, lp, gain)
        else:
            for name in gain:
                if a.linears(layer)[name].bias is None:
                    _add_bias_(a.linears(layer)[name], None)
    update_config_(lm, plan, flags, extra)


def update_config_(lm, plan: StructurePlan, flags: dict[str, bool], extra: list[str]) -> None:
    """Write the pruned sizes into ``lm``'s config (vanilla fields or per_layer_config)."""
    config = lm.model.config
    config.head_dim = plan.head_dim  # explicit: the default hidden // heads would change with the heads
    for flag in flags:
        setattr(config, flag, True)
    previous = list(getattr(config, EXTRA_BIAS_KEY, None) or [])
    if extra or previous:
        setattr(config, EXTRA_BIAS_KEY, sorted(set(previous) | set(extra)))
    sizes = [dict(zip(PER_LAYER_KEYS, t, strict=True)) for t in
             zip(plan.heads_per_layer, plan.kv_heads_per_layer, plan.ffn_per_layer, strict=True)]
    if plan.is_uniform and _vanilla_ok(config, sizes[0]):
        if getattr(config, "is_heterogeneous", False):
            config.per_layer_config = None
        for key, value in sizes[0].items():
            setattr(config, key, value)
    else:
        if plan.is_uniform:
            plan.notes.append(f"every layer has {sizes[0]['num_attention_heads']} heads, but "
                              f"{type(config).__name__} refuses that head count as a global value "
                              "(hidden_size must be a multiple of it): stored as per_layer_config")
        config.allow_global_per_layer_attribute_access = True  # the global values stay the dense ones
        if getattr(config, "is_heterogeneous", False):
            config.per_layer_config = None
        config.per_layer_config = {i: dict(s) for i, s in enumerate(sizes)}
    set_auto_map(config)


def _vanilla_ok(config, sizes: dict) -> bool:
    """Whether the config class accepts ``sizes`` as its global values (LlamaConfig checks
    hidden_size % num_attention_heads)."""
    d = config.to_dict()
    d.pop("per_layer_config", None)
    d.update(sizes)
    try:
        type(config)(**d)
    except Exception:  # the config class's own validation error, whatever its type
        return False
    return True
