"""The method contract: what a pruning method needs, and what it produces.

Every method (``methods/unstructured/``, ``methods/structured/``) is a ``Method``:
a config dataclass (``config_class``) and a class registered by name
(``@register("wanda")``, methods/registry.py) that declares

    needs()     Needs.NOTHING       the weights alone (magnitude, magnitude-sp, LLM-Pruner's l2)
                Needs.LAYER_STATS   input statistics of each Linear, collected layer by layer by
                                    the sequential engine (calibration/engine.py): Wanda, SparseGPT,
                                    FLAP, Wanda-sp
                Needs.GRADIENTS     one whole-model pass over the calibration windows, with
                                    back-propagation (calibration/gradients.py): LLM-Pruner's Taylor
    produces    Produces.MASKS      zeros inside unchanged shapes (unstructured / N:M)
                Produces.PLAN       a structure plan (heads, KV heads, FFN channels kept per layer),
                                    which only methods/structured/surgery.py applies

and implements the hooks of its kind (``UnstructuredMethod.make_stats`` /
``prune_``; ``StructuredMethod.channel_scores`` or ``model_scores``). One
dispatcher, ``methods.dispatch.run_method``, runs any method: it checks the data
and the device placement the method needs, runs the engine or the gradient pass,
and returns a ``MethodResult``. A method never loads data and never moves a model,
a layer or data between devices (it only puts small tensors beside the weights it
works on). See docs/adding-a-method.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from codeprune.errors import ConfigError


class Needs(str, Enum):
    """What a method needs besides the weights."""

    NOTHING = "nothing"
    LAYER_STATS = "layer-stats"
    GRADIENTS = "gradients"


class Produces(str, Enum):
    """What a method's run leaves behind."""

    MASKS = "masks"
    PLAN = "plan"


@dataclass
class GradientRequest:
    """The whole-model pass a ``Needs.GRADIENTS`` method asks for (calibration.gradients.gradient_pass)."""

    layers: list[int]  # decoder layers whose Linears get gradients (and input statistics)
    second_order: bool = False  # also the mean squared per-sample gradient (diagonal Fisher)
    checkpointing: bool = True  # activation checkpointing during the pass
    input_stats: bool = False  # inputs of the output projections (bias compensation)
    backward: bool = True  # False: forward passes and statistics only


@dataclass
class MethodResult:
    """What ``run_method`` returns."""

    produces: Produces
    pruned: list = field(default_factory=list)  # MASKS: the Linears that were masked
    plan: Any = None  # PLAN: the methods.structured.plan.StructurePlan applied
    gradients: Any = None  # the calibration.gradients.GradientPass, for GRADIENTS methods


class Method(ABC):
    """Base class of every registered pruning method."""

    name: ClassVar[str] = ""  # set by @register
    config_class: ClassVar[type]
    produces: ClassVar[Produces]

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def needs(self) -> Needs:
        """What this configured method needs (it may depend on the options: compensation needs data)."""

    @property
    def uses_data(self) -> bool:
        return self.needs() is not Needs.NOTHING


def check_placement(method: Method, offload: bool) -> None:
    """ConfigError when ``offload`` (one layer at a time on the device) cannot run ``method``."""
    if offload and method.needs() is Needs.GRADIENTS:
        raise ConfigError(f"'{method.name}' back-propagates through the whole model, which must fit on "
                          "the device: drop --offload")


def check_inputs(method: Method, input_ids, offload: bool) -> None:
    """ConfigError unless ``method`` can run with these inputs (called before any work)."""
    check_placement(method, offload)
    if method.needs() is not Needs.NOTHING and input_ids is None:
        raise ConfigError(f"method '{method.name}' needs calibration data")
