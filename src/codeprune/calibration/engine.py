"""The sequential engine: calibrate a model one decoder layer at a time.

    capture the inputs of layer 0 and every layer's keyword arguments
              (one forward of the decoder per batch with its layers stubbed out)
    for each layer:
        [device]  move the layer to the compute device (with --offload)
        pass 1    run it on every batch with pre-hooks that feed input statistics
                  to accumulators; stop at the last hooked Linear (its output is
                  never needed), so this pass skips e.g. down_proj's matmul
        method    ``on_layer`` turns statistics into masks / weight updates
        pass 2    run the (now pruned) layer: its outputs are the next layer's inputs
        [device]  move it back to the CPU

So layer k+1 is calibrated on the outputs of the already-pruned layer k, as in
Wanda and SparseGPT. Whole-model methods (LLM-Pruner) use ``gradient_pass``
instead: one forward/backward per sample over the whole model on the device,
folding each prunable weight's gradient into float32 sums.

Keyword arguments are per layer: families that mix sliding-window and full
attention (``config.layer_types``) give each layer its own attention mask, so
reusing layer 0's would calibrate the other layers on the wrong mask. To get
exactly what the model passes, without running any layer, the capture forward
swaps every decoder layer for a ``_Catcher`` stub that records its (hidden,
kwargs) and returns the hidden states unchanged: the decoder's own code builds the
masks and position embeddings for each layer, and the cost is the embeddings, the
mask builder and the final norm per batch. The kwargs are references to tensors
the decoder shares across layers (one mask per layer type, one rotary pair), so
keeping them per layer costs no extra memory. Hidden states are kept for layer 0
only; later layers get theirs from the previous layer's outputs.

The engine places layers and activations (the gradient pass does the same for
whole-model methods); methods see modules and accumulators that already live
where the compute happens.
Sequence length is whatever the calibration windows carry (the user's
``--seq-len``), never ``max_position_embeddings``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from codeprune.calibration.devices import resolve_device
from codeprune.errors import ConfigError, CorruptModelError
from codeprune.models.loading import LoadedModel


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class LayerInput:
    """The arguments one batch passes to the decoder layers."""

    hidden: torch.Tensor  # (B, L, D): the inputs of the layer about to run
    layer_kwargs: list[dict]  # per layer: attention mask, position ids/embeddings, ... as the model passes


StatsFactory = Callable[[str, nn.Linear], object]  # (group's first sublayer name, Linear) -> accumulator


LayerCallback = Callable[[int, nn.Module, dict, dict], None]  # (index, layer, linears, stats)


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index`` during the capture forward: records what the
    decoder passes it, returns the hidden states unchanged, and reads any other attribute
    (e.g. ``attention_type``) from the real layer."""

    def __init__(self, layer: nn.Module, index: int, record: Callable[[int, torch.Tensor, dict], None]):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its weights stay where they are
        self.index, self.record = index, record

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:  # the engine replays the layer as layer(hidden, **kwargs)
            raise TypeError("a decoder layer must get everything but its hidden states by keyword")
        self.record(self.index, hidden, kwargs)
        return hidden


@torch.no_grad()
def capture_layer_inputs(lm: LoadedModel, input_ids: torch.Tensor, *, device: torch.device,
                         batch_size: int) -> list[LayerInput]:
    """Per batch: layer 0's input hidden states and every layer's keyword arguments, from one
    decoder forward with the layers replaced by stubs (see the module docstring)."""
    adapter = lm.adapter
    originals = adapter.layers()
    captured: list[LayerInput] = []
    hidden: list[torch.Tensor] = []  # this batch's layer-0 input
    kwargs: list[dict] = []  # this batch's keyword arguments, one dict per layer

    def record(index: int, h: torch.Tensor, kw: dict) -> None:
        if index == 0:
            hidden.append(h)
        kwargs.append(dict(kw))

    adapter.set_layers(nn.ModuleList([_Catcher(layer, i, record) for i, layer in enumerate(originals)]))
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            hidden.clear()
            kwargs.clear()
            adapter.decoder(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            if len(kwargs) != len(originals):
                raise RuntimeError(f"the decoder ran {len(kwargs)} of its {len(originals)} layers")
            captured.append(LayerInput(hidden[0], list(kwargs)))
    finally:
        adapter.set_layers(originals)
    return captured


@torch.no_grad()
def run_layer(index: int, layer: nn.Module, inputs: list[LayerInput], device: torch.device,
              store: torch.device) -> None:
    """Replace each batch's hidden states by the output of layer ``index`` (kept on ``store``)."""
    for inp in inputs:
        out = _layer_output(layer(inp.hidden.to(device), **inp.layer_kwargs[index]))
        inp.hidden = out.to(store)


def _check_finite(lm: LoadedModel, inputs: list[LayerInput], index: int) -> None:
    """Non-finite hidden states would turn every score into NaN: stop with the model's name."""
    if not all(bool(torch.isfinite(inp.hidden).all()) for inp in inputs):
        dtype = str(inputs[0].hidden.dtype).removeprefix("torch.")
        raise CorruptModelError(f"model '{lm.name}' gives non-finite activations (nan/inf) after decoder "
                                f"layer {index}: its weights are corrupt or overflow in {dtype}")


@torch.no_grad()
def collect_stats(index: int, layer: nn.Module, linears: dict[str, nn.Linear], groups,
                  inputs: list[LayerInput], make_stats: StatsFactory,
                  device: torch.device) -> dict[str, object]:
    """Pass 1 over layer ``index``: input statistics for each Linear (shared within an input
    group; ``groups`` in execution order, the adapter's ``input_groups``)."""
    stats: dict[str, object] = {}
    hooked: list[str] = []
    for group in groups:
        acc = make_stats(group[0], linears[group[0]])
        if acc is None:
            continue
        for name in group:
            stats[name] = acc
        hooked.append(group[0])
    if not hooked:
        return stats
    last = hooked[-1]

    def hook_for(name):
        def hook(module, args):
            stats[name].add_batch(args[0])
            if name == last:
                raise _StopForward  # nothing after the last hooked input is needed
        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in hooked]
    try:
        for inp in inputs:
            try:
                layer(inp.hidden.to(device), **inp.layer_kwargs[index])
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def calibrate_layers(lm: LoadedModel, input_ids: torch.Tensor, *, make_stats: StatsFactory,
                     on_layer: LayerCallback, device: str | torch.device = "cpu",
                     offload: bool = False, batch_size: int = 8, desc: str = "layers",
                     keep_outputs: bool = False) -> list[LayerInput] | None:
    """Sequential calibration of every decoder layer (see the module docstring).

    ``input_ids``: (N, L) calibration windows. ``offload``: keep the model on the
    CPU and bring one layer at a time to ``device``; otherwise the whole model
    moves to ``device`` first. With ``keep_outputs`` the last layer runs too and
    its outputs (before the final norm) are returned, one entry per batch."""
    dev = resolve_device(device)
    model, adapter = lm.model, lm.adapter
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    layerwise = offload  # on the CPU the moves below are no-ops, and the same code path runs
    store = torch.device("cpu") if layerwise else dev
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        if layerwise:
            for m in adapter.outside_layers():
                m.to(dev)
        else:
            model.to(dev)
        inputs = capture_layer_inputs(lm, input_ids, device=dev, batch_size=batch_size)
        if layerwise:
            for m in adapter.outside_layers():
                m.to("cpu")
        for inp in inputs:
            inp.hidden = inp.hidden.to(store)
        for i, layer in enumerate(tqdm(adapter.layers(), desc=desc, leave=False)):
            if layerwise:
                layer.to(dev)
            linears = adapter.linears(layer)
            stats = collect_stats(i, layer, linears, adapter.input_groups, inputs, make_stats, dev)
            on_layer(i, layer, linears, stats)
            del stats  # free the accumulators before the next layer allocates its own
            if keep_outputs or i + 1 < adapter.num_layers:  # else nothing reads the last outputs
                run_layer(i, layer, inputs, dev, store)
                _check_finite(lm, inputs, i)
            if layerwise:
                layer.to("cpu")
        return inputs if keep_outputs else None
    finally:
        model.config.use_cache = use_cache
        if layerwise:
            model.to("cpu")


def forward_layers(lm: LoadedModel, input_ids: torch.Tensor, *, device: str | torch.device = "cpu",
                   offload: bool = False, batch_size: int = 8) -> list[torch.Tensor]:
    """The last decoder layer's outputs (before the final norm), one (B, L, D) tensor per
    batch, computed one layer at a time: a forward pass for models that do not fit the device."""
    outs = calibrate_layers(lm, input_ids, make_stats=lambda name, linear: None,
                            on_layer=lambda *args: None, device=device, offload=offload,
                            batch_size=batch_size, desc="forward", keep_outputs=True)
    return [o.hidden for o in outs]
