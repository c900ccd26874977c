"""The one dispatcher: run any registered method on a model, whatever it needs and produces.

    result = run_method(lm, make_pruner("flap", ratio=0.2), calib_ids, device="cuda")
    result.plan            # Produces.PLAN: the structure plan applied (shapes changed)
    result.pruned          # Produces.MASKS: the Linears masked in place (shapes kept)

The recipe runner (every prune: a single method is a one-stage recipe) and the
language sweep call this; see methods/contract.py for the contract.
"""

from __future__ import annotations

import torch

from codeprune.methods.contract import Method, MethodResult, Needs, Produces, check_inputs
from codeprune.methods.structured.prune import prune_structured_
from codeprune.methods.unstructured.base import prune_model_


def run_method(lm, method: Method, input_ids: torch.Tensor | None, *, device="cpu", offload: bool = False,
               batch_size: int = 8) -> MethodResult:
    """Prune ``lm`` in place with ``method`` on the calibration windows ``input_ids`` (ignored,
    and may be None, when the method needs nothing but the weights)."""
    check_inputs(method, input_ids, offload)
    ids = input_ids if method.needs() is not Needs.NOTHING else None
    if method.produces is Produces.MASKS:
        pruned = prune_model_(lm, method, ids, device=device, offload=offload, batch_size=batch_size)
        return MethodResult(Produces.MASKS, pruned=pruned)
    plan = prune_structured_(lm, method, ids, device=device, offload=offload, batch_size=batch_size)
    return MethodResult(Produces.PLAN, plan=plan, gradients=plan.gradients)
