"""calibration: a model whose loss or activations are not finite is refused with its name."""

import pytest
import torch

from codeprune.calibration.gradients import gradient_pass
from codeprune.errors import CorruptModelError


def test_non_finite_loss_is_a_clear_error(tiny_llama, random_ids):
    """A corrupt weight (NaN) stops the gradient pass with the model's name, not a NaN ranking."""
    with torch.no_grad():
        tiny_llama.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CorruptModelError, match="tiny-llama' gives a non-finite loss"):
        gradient_pass(tiny_llama, random_ids[:2], [0, 1])


def test_non_finite_activations_stop_calibration(tiny_llama, random_ids):
    """The layer-by-layer engine (Wanda, FLAP, SparseGPT statistics) names the model and layer."""
    from codeprune.calibration.engine import calibrate_layers

    with torch.no_grad():
        tiny_llama.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(CorruptModelError, match="non-finite activations .* after decoder layer 0"):
        calibrate_layers(tiny_llama, random_ids[:2], make_stats=lambda name, linear: None,
                         on_layer=lambda *args: None)
