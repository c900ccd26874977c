"""The sequential engine: calibrate a model one decoder layer at a time.

    capture the inputs of layer 0 (one forward of the embeddings per batch)
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

Only the engine moves tensors between devices; methods see
modules and accumulators that already live where the compute happens.
Sequence length is whatever the calibration windows carry (the user's
``--seq-len``), never ``max_position_embeddings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .models.adapters import INPUT_GROUPS
from .models.sources import LoadedModel
from .stats import ChannelStats


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class LayerInput:
    """The arguments one batch passes to a decoder layer."""

    hidden: torch.Tensor  # (B, L, D)
    kwargs: dict  # attention mask, position ids/embeddings, ... exactly as the model passes them


StatsFactory = Callable[[str, nn.Linear], object]  # (group's first sublayer name, Linear) -> accumulator
LayerCallback = Callable[[int, nn.Module, dict, dict], None]  # (index, layer, linears, stats)


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available (use --device cpu)")
    return dev


def place_model(lm: LoadedModel, device: str | torch.device) -> torch.device:
    """Move the whole model to ``device`` (for evaluation without offload); returns the device."""
    dev = resolve_device(device)
    lm.model.to(dev)
    return dev


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_layer_inputs(lm: LoadedModel, input_ids: torch.Tensor, *, device: torch.device,
                         batch_size: int) -> list[LayerInput]:
    """Run the embeddings on every batch and stop at layer 0, keeping what it receives."""
    first = lm.adapter.layers()[0]
    captured: list[LayerInput] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                lm.adapter.decoder(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput], device: torch.device,
              store: torch.device) -> None:
    """Replace each batch's hidden states by the layer's output (kept on ``store``)."""
    for inp in inputs:
        out = _layer_output(layer(inp.hidden.to(device), **inp.kwargs))
        inp.hidden = out.to(store)


@torch.no_grad()
def collect_stats(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[LayerInput],
                  make_stats: StatsFactory, device: torch.device) -> dict[str, object]:
    """Pass 1 over one layer: input statistics for each Linear (shared within an input group)."""
    stats: dict[str, object] = {}
    hooked: list[str] = []
    for group in INPUT_GROUPS:
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
                layer(inp.hidden.to(device), **inp.kwargs)
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
            stats = collect_stats(layer, linears, inputs, make_stats, dev)
            on_layer(i, layer, linears, stats)
            del stats  # free the accumulators before the next layer allocates its own
            if keep_outputs or i + 1 < adapter.num_layers:  # else nothing reads the last outputs
                run_layer(layer, inputs, dev, store)
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


# -- the gradient pass (whole-model methods: LLM-Pruner's Taylor importance) ----------------

@dataclass
class GradientPass:
    """Mean gradient (and mean squared per-sample gradient) of the prunable parameters."""

    grad: dict[str, torch.Tensor]  # "layer.sublayer.weight|bias" -> mean over samples of g_n (float32)
    fisher: dict[str, torch.Tensor] | None  # mean over samples of g_n^2 (float32), element2 only
    samples: int
    seconds: float
    loss: float  # mean next-token loss of the dense model on the samples
    peak_memory_mb: float | None  # CUDA: max allocated during the pass; CPU: None (see peak_rss_mb)
    stats: dict[str, ChannelStats] = field(default_factory=dict)  # "layer.o_proj|down_proj" inputs


def prunable_parameters(lm, layers: list[int]) -> dict[str, nn.Parameter]:
    """The weights (and biases) of every Linear in ``layers``, by "i.sublayer.weight"."""
    a = lm.adapter
    out = {}
    for i in layers:
        for name, lin in a.linears(a.layers()[i]).items():
            for kind, p in (("weight", lin.weight), ("bias", lin.bias)):
                if p is not None:
                    out[f"{i}.{name}.{kind}"] = p
    return out


def _checkpointing_on(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


def _checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on/off (the transformers 5.x name, or the older one).

    transformers also hooks the embeddings to make their output require a gradient
    (needed by reentrant checkpointing and PEFT); non-reentrant checkpointing does not
    need it, and it would make backward run through the layers outside the scope."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def gradient_pass(lm, input_ids: torch.Tensor, layers: list[int], *, second_order: bool = False,
                  checkpointing: bool = True, device="cpu", input_stats: bool = False,
                  backward: bool = True) -> GradientPass:
    """Back-propagate the next-token loss of each calibration sample (one at a time) and
    accumulate g (and g^2) in float32 for the Linears of ``layers`` only.

    With ``input_stats`` the inputs of o_proj and down_proj in those layers are also
    collected (for bias compensation), from the forward passes only (not the
    recomputation that checkpointing does during backward). ``backward=False``: the
    forward passes and statistics only (no gradients, nothing kept for them)."""
    model = lm.model
    params = prunable_parameters(lm, layers) if backward else {}
    checkpointing = checkpointing and backward and not _checkpointing_on(model)
    dev = place_model(lm, device)
    frozen = {p: p.requires_grad for p in model.parameters()}
    sums = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()}
    squares = ({k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()}
               if second_order else None)
    stats: dict[str, ChannelStats] = {}
    recording = [False]
    handles = []

    def fold(key):
        def hook(p):
            g = p.grad.float()
            sums[key].add_(g)
            if squares is not None:
                squares[key].addcmul_(g, g)
            p.grad = None  # free it now: only one gradient exists at a time
        return hook

    def collect(key):
        def pre_hook(module, args):
            if recording[0]:
                stats.setdefault(key, ChannelStats(moments=True)).add_batch(args[0].detach())
        return pre_hook

    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for key, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(fold(key)))
        if input_stats:
            a = lm.adapter
            for i in layers:
                lin = a.linears(a.layers()[i])
                for name in ("o_proj", "down_proj"):
                    handles.append(lin[name].register_forward_pre_hook(collect(f"{i}.{name}")))
        if checkpointing:
            _checkpointing(model, True)
            model.train()  # transformers checkpoints only in training mode (dropout is 0 in these models)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        start, total_loss = time.perf_counter(), 0.0
        n = input_ids.shape[0]
        for k in tqdm(range(n), desc="taylor gradients" if backward else "taylor statistics", unit="sample"):
            ids = input_ids[k:k + 1].to(dev)
            recording[0] = True
            with torch.set_grad_enabled(backward):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            recording[0] = False
            if backward:
                loss.backward()
            total_loss += float(loss.detach())
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    finally:
        recording[0] = False
        for h in handles:
            h.remove()
        if checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for p, flag in frozen.items():
            p.requires_grad_(flag)
            p.grad = None
    for t in sums.values():
        t.div_(n)
    if squares is not None:
        for t in squares.values():
            t.div_(n)
    return GradientPass(sums, squares, n, seconds, total_loss / n, peak, stats)
