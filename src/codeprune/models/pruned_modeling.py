"""Modeling code for structurally pruned checkpoints written by codeprune.

models.checkpoint.save_checkpoint writes this file beside the weights as
``modeling_codeprune.py`` when a checkpoint cannot be built by plain
transformers: layers of different sizes (``per_layer_config`` in config.json)
or compensation biases the architecture has no config flag for
(``codeprune_extra_bias``). It appends one generated line that builds the class
for the checkpoint's family from the family's adapter, e.g.

    CodepruneLlamaForCausalLM = make_class("llama", "Llama", {"o_proj": "self_attn.o_proj", ...})

and ``config.auto_map`` points AutoModelForCausalLM at that class, so

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

builds the family's own classes (same ``model_type``, same forward, same cache,
``generate`` unchanged) with each layer sized from its per-layer config.
``codeprune.load(path)`` calls ``make_class`` from the installed package instead
(models.checkpoint.pruned_model_class). This file names no family itself.

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

_CLASSES: dict[tuple, type] = {}


def class_name(prefix: str) -> str:
    """The generated class's name for a transformers class prefix ("Llama")."""
    return f"Codeprune{prefix}ForCausalLM"


def _resize_layers(model: nn.Module, config, layer_class, paths: dict[str, str]) -> None:
    """Rebuild every layer from its own config, then give the listed sublayers a bias."""
    layers = model.model.layers
    if getattr(config, "is_heterogeneous", False):
        for i in range(len(layers)):
            layers[i] = layer_class(config.per_layer_config[i], i)
    for name in getattr(config, "codeprune_extra_bias", None) or []:
        for layer in layers:
            linear = layer.get_submodule(paths[name])
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))


def make_class(module: str, prefix: str, paths: dict[str, str]) -> type:
    """``<prefix>ForCausalLM`` of ``transformers.models.<module>`` whose layers may differ in
    size; ``paths`` maps the sublayer names of ``codeprune_extra_bias`` to their module
    paths inside a decoder layer. One class per family and paths (cached)."""
    key = (module, prefix, tuple(sorted(paths.items())))
    if key in _CLASSES:
        return _CLASSES[key]
    base = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    parent = getattr(base, f"{prefix}ForCausalLM")
    layer_class = getattr(base, f"{prefix}DecoderLayer")
    paths = dict(paths)

    def __init__(self, config):
        parent.__init__(self, config)
        _resize_layers(self, config, layer_class, paths)
        self.post_init()

    doc = f"{parent.__name__} whose layers may differ in heads and FFN width (codeprune)."
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    _CLASSES[key] = type(class_name(prefix), (parent,), namespace)
    return _CLASSES[key]
