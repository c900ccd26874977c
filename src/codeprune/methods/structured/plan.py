"""The structure plan: what every layer keeps, and the model it leads to (surgery.py applies it).

A structured method (FLAP, Wanda-sp, ...) produces a ``StructurePlan``: for every
decoder layer, the attention heads and FFN channels it keeps and the compensation
biases it adds. The plan knows the parameter count it leads to before any weight
is touched; ``apply_plan_`` then slices the weights and updates the config.

    plan = StructurePlan.dense(lm.adapter)          # keeps everything
    plan.layers[3] = LayerPlan(kv_heads=[0, 1], q_heads=[0, 2, 3, 5], channels=[...])
    plan.param_count(lm)                             # {"total": ..., "decoder": ...}
    apply_plan_(lm, plan)                            # slice, add biases, update config

Grouped-query attention: query head h reads KV head h // n_rep. A plan keeps a
list of KV heads and, for every kept KV head, the same number of its own query
heads; surgery orders the kept query heads group by group, so the model's
mapping holds again with n_rep' = len(q_heads) / len(kv_heads) and
num_attention_heads stays divisible by num_key_value_heads.

Empty layers: a plan keeps at least one query head (with its KV head) and one
FFN channel in every layer; ``validate`` refuses anything else. A layer with no
attention or no MLP would need a different layer class, which neither vLLM nor
plain transformers provides; the cost of the one unit kept is a fraction of a
percent of the layer.

Config after surgery (see docs/structured.md):
- every layer the same size -> the vanilla fields (num_attention_heads,
  num_key_value_heads, intermediate_size, head_dim) of the same ``model_type``;
- layers that differ -> ``per_layer_config`` (transformers' heterogeneous-config
  convention) plus ``auto_map`` to ``modeling_codeprune.py``, which
  ``models.checkpoint.save_checkpoint`` writes beside the weights;
- compensation biases use the family's own bias flags where it has them
  (Llama: attention_bias / mlp_bias, the other projections get zero biases) so
  the checkpoint stays plain; otherwise ``codeprune_extra_bias`` lists the
  sublayers the modeling file gives a bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from codeprune.errors import ConfigError
from codeprune.models.adapters.base import DecoderAdapter

logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)


@dataclass
class LayerPlan:
    """What one decoder layer keeps (original indices)."""

    kv_heads: list[int]  # kept KV heads, ascending
    q_heads: list[int]  # kept query heads, grouped by KV head (surgery sorts them)
    channels: list[int]  # kept FFN channels, ascending
    o_bias: torch.Tensor | None = None  # (hidden,) added to o_proj's output (compensation)
    down_bias: torch.Tensor | None = None  # (hidden,) added to down_proj's output


@dataclass
class StructurePlan:
    """Per-layer kept structure of a whole model; ``n_rep`` = query heads per KV head of the
    model the plan was made for."""

    layers: list[LayerPlan]
    head_dim: int
    n_rep: int
    notes: list[str] = field(default_factory=list)
    planned_params: dict | None = None  # param_count() recorded before surgery
    gradients: Any = None  # the gradient pass that scored it (calibration.gradients.GradientPass), if any

    @classmethod
    def dense(cls, adapter: DecoderAdapter) -> StructurePlan:
        """The plan that keeps every head and channel of ``adapter``'s model."""
        layers = []
        for layer in adapter.layers():
            s = adapter.layer_sizes(layer)
            layers.append(LayerPlan(list(range(s["kv_heads"])), list(range(s["heads"])),
                                    list(range(s["intermediate"]))))
        first = adapter.layer_sizes(adapter.layers()[0])
        return cls(layers, adapter.head_dim, first["heads"] // first["kv_heads"])

    # -- what the plan leads to -------------------------------------------------
    @property
    def heads_per_layer(self) -> list[int]:
        return [len(lp.q_heads) for lp in self.layers]

    @property
    def kv_heads_per_layer(self) -> list[int]:
        return [len(lp.kv_heads) for lp in self.layers]

    @property
    def ffn_per_layer(self) -> list[int]:
        return [len(lp.channels) for lp in self.layers]

    @property
    def is_uniform(self) -> bool:
        sizes = set(zip(self.heads_per_layer, self.kv_heads_per_layer, self.ffn_per_layer, strict=True))
        return len(sizes) == 1

    def new_biases(self, adapter: DecoderAdapter) -> tuple[dict[str, bool], set[str], list[str]]:
        """How the compensation biases will be stored: ({config flag: True} to set,
        sublayers that gain a (possibly zero) bias in every layer, sublayers needing
        the modeling file's extra bias)."""
        needed = []
        if any(lp.o_bias is not None for lp in self.layers):
            needed.append("o_proj")
        if any(lp.down_bias is not None for lp in self.layers):
            needed.append("down_proj")
        return bias_storage(adapter, needed)

    def validate(self, adapter: DecoderAdapter, skip: set[int] = frozenset()) -> None:
        """Raise ConfigError unless the plan gives a valid model (GQA rules, one unit kept per
        layer); layers in ``skip`` are already sliced and not checked again."""
        if len(self.layers) != adapter.num_layers:
            raise ConfigError(f"plan has {len(self.layers)} layers, the model {adapter.num_layers}")
        for i, (layer, lp) in enumerate(zip(adapter.layers(), self.layers, strict=True)):
            if i in skip:
                continue
            s = adapter.layer_sizes(layer)
            n_rep = s["heads"] // s["kv_heads"]
            if not lp.q_heads or not lp.channels:
                raise ConfigError(f"layer {i}: a plan keeps at least one head and one FFN channel")
            if len(set(lp.q_heads)) != len(lp.q_heads) or not set(lp.q_heads) <= set(range(s["heads"])):
                raise ConfigError(f"layer {i}: bad query head indices {lp.q_heads}")
            if len(set(lp.kv_heads)) != len(lp.kv_heads) or not set(lp.kv_heads) <= set(range(s["kv_heads"])):
                raise ConfigError(f"layer {i}: bad KV head indices {lp.kv_heads}")
            channels = set(lp.channels)
            if not channels <= set(range(s["intermediate"])) or len(channels) != len(lp.channels):
                raise ConfigError(f"layer {i}: bad FFN channel indices")
            per_group = {g: 0 for g in lp.kv_heads}
            for h in lp.q_heads:
                if h // n_rep not in per_group:
                    raise ConfigError(f"layer {i}: query head {h} kept without its KV head {h // n_rep}")
                per_group[h // n_rep] += 1
            if len(set(per_group.values())) != 1:
                raise ConfigError(f"layer {i}: every KV group must keep the same number of query "
                                  f"heads (GQA), got {sorted(per_group.values())}")

    def param_count(self, lm) -> dict[str, int]:
        """{"total", "decoder"}: the parameters the model will have after ``apply_plan_``
        (tied embeddings once), computed from shapes only."""
        a = lm.adapter
        total_now = sum(p.numel() for p in lm.model.parameters())  # shapes only: no zero count
        _, gain, _ = self.new_biases(a)
        hidden, hd = a.hidden_size, self.head_dim
        decoder_now = decoder = 0
        for layer, lp in zip(a.layers(), self.layers, strict=True):
            lin = a.linears(layer)
            layer_params = sum(p.numel() for p in layer.parameters())
            decoder_now += layer_params
            decoder += layer_params - sum(p.numel() for m in lin.values() for p in m.parameters())
            nq, nkv, c = len(lp.q_heads) * hd, len(lp.kv_heads) * hd, len(lp.channels)
            shapes = {"q_proj": (nq, hidden), "k_proj": (nkv, hidden), "v_proj": (nkv, hidden),
                      "o_proj": (hidden, nq), "gate_proj": (c, hidden), "up_proj": (c, hidden),
                      "down_proj": (hidden, c)}
            for name, (rows, cols) in shapes.items():
                has_bias = lin[name].bias is not None or name in gain
                decoder += rows * cols + (rows if has_bias else 0)
        return {"total": total_now - decoder_now + decoder, "decoder": decoder}

    def describe(self) -> dict:
        return {"heads_per_layer": self.heads_per_layer, "kv_heads_per_layer": self.kv_heads_per_layer,
                "ffn_per_layer": self.ffn_per_layer, "uniform": self.is_uniform}


def bias_storage(adapter: DecoderAdapter, needed: list[str]) -> tuple[dict[str, bool], set[str], list[str]]:
    """For sublayers ``needed`` a bias: ({config flag: True}, sublayers that gain a bias in
    every layer, sublayers only the modeling file's ``codeprune_extra_bias`` can give one)."""
    flags, gain, extra = {}, set(), []
    for name in needed:
        flag = next((f for f, members in adapter.bias_flags.items() if name in members), None)
        if flag is not None:
            flags[flag] = True
            gain.update(adapter.bias_flags[flag])
        else:
            gain.add(name)
            extra.append(name)
    return flags, gain, extra


def decoder_param_count(adapter: DecoderAdapter) -> int:
    """Parameters inside the decoder layers (attention, MLP, norms)."""
    return sum(p.numel() for layer in adapter.layers() for p in layer.parameters())
