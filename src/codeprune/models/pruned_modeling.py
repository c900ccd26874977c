"""Modeling code for structurally pruned checkpoints written by codeprune.

export.save_checkpoint copies this file beside the weights as
``modeling_codeprune.py`` when a checkpoint cannot be built by plain
transformers: layers of different sizes (``per_layer_config`` in config.json)
or compensation biases the architecture has no config flag for
(``codeprune_extra_bias``). ``config.auto_map`` points AutoModelForCausalLM at
the class for the checkpoint's family, so

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

builds the family's own classes (same ``model_type``, same forward, same cache,
``generate`` unchanged) with each layer sized from its per-layer config.
``codeprune.load(path)`` uses this module from the installed package instead.

This file imports only torch and transformers: it must run without codeprune.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

# transformers warns when the global value of a per-layer attribute is read; the
# global values of these configs are the dense model's, read by code that does not
# depend on them (the layers are built from their own per-layer configs below).
logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)

# model_type -> (transformers module, class prefix)
FAMILIES = {"llama": ("llama", "Llama"), "qwen2": ("qwen2", "Qwen2"),
            "mistral": ("mistral", "Mistral"), "qwen3": ("qwen3", "Qwen3")}
SUBMODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def class_name(model_type: str) -> str:
    return f"Codeprune{FAMILIES[model_type][1]}ForCausalLM"


def _resize_layers(model: nn.Module, config, layer_class) -> None:
    """Rebuild every layer from its own config, then give the listed sublayers a bias."""
    layers = model.model.layers
    if getattr(config, "is_heterogeneous", False):
        for i in range(len(layers)):
            layers[i] = layer_class(config.per_layer_config[i], i)
    for name in getattr(config, "codeprune_extra_bias", None) or []:
        for layer in layers:
            linear = getattr(getattr(layer, SUBMODULES[name]), name)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))


def _make_class(model_type: str) -> type:
    module, prefix = FAMILIES[model_type]
    base = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    parent = getattr(base, f"{prefix}ForCausalLM")
    layer_class = getattr(base, f"{prefix}DecoderLayer")

    def __init__(self, config):
        parent.__init__(self, config)
        _resize_layers(self, config, layer_class)
        self.post_init()

    doc = f"{parent.__name__} whose layers may differ in heads and FFN width (codeprune)."
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    return type(class_name(model_type), (parent,), namespace)


def model_class(model_type: str) -> type:
    return globals()[class_name(model_type)]


CodepruneLlamaForCausalLM = _make_class("llama")
CodepruneQwen2ForCausalLM = _make_class("qwen2")
CodepruneMistralForCausalLM = _make_class("mistral")
CodepruneQwen3ForCausalLM = _make_class("qwen3")
