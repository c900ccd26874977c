"""The whole-model gradient pass: per-sample gradients of the prunable Linears, folded
into float32 sums as they arrive (LLM-Pruner's first- and second-order Taylor scores),
optionally with the input statistics of each layer's output Linears.

    grads = gradient_pass(lm, calib.input_ids, layers=[2, 3], device="cuda", second_order=True)
    grads.grad["2.q_proj.weight"]   # mean gradient over the samples

methods/structured/prune.py runs it for the methods that ask for a gradient pass (Taylor).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from codeprune.calibration.devices import place_model
from codeprune.calibration.stats import ChannelStats
from codeprune.errors import CorruptModelError


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


class _Accumulator:
    """Float32 sums of the hooked parameters' gradients (and squared gradients), folded in by
    post-accumulate hooks that free each gradient at once, and the input statistics of the
    output projections, recorded during the forward passes only."""

    def __init__(self, params: dict[str, nn.Parameter], second_order: bool):
        def zeros():
            return {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()}

        self.sums = zeros()
        self.squares = zeros() if second_order else None
        self.stats: dict[str, ChannelStats] = {}
        self.recording = False  # True during a forward pass (not checkpointing's recomputation)
        self.handles = []
        for key, p in params.items():
            p.requires_grad_(True)
            self.handles.append(p.register_post_accumulate_grad_hook(self._fold(key)))

    def _fold(self, key: str):
        def hook(p):
            g = p.grad.float()
            self.sums[key].add_(g)
            if self.squares is not None:
                self.squares[key].addcmul_(g, g)
            p.grad = None  # free it now: only one gradient exists at a time
        return hook

    def hook_inputs(self, lm, layers: list[int]) -> None:
        """Record the inputs of the output projections (o_proj, down_proj) of ``layers``."""
        a = lm.adapter
        outputs = (*a.roles["attention_output"], *a.roles["mlp_output"])
        for i in layers:
            lin = a.linears(a.layers()[i])
            for name in outputs:
                self.handles.append(lin[name].register_forward_pre_hook(self._collect(f"{i}.{name}")))

    def _collect(self, key: str):
        def pre_hook(module, args):
            if self.recording:
                self.stats.setdefault(key, ChannelStats(moments=True)).add_batch(args[0].detach())
        return pre_hook

    def remove(self) -> None:
        self.recording = False
        for h in self.handles:
            h.remove()

    def means(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        for t in (*self.sums.values(), *(self.squares or {}).values()):
            t.div_(n)
        return self.sums, self.squares


@contextlib.contextmanager
def _frozen(model, checkpointing: bool):
    """Every parameter frozen (the accumulator unfreezes its own), training mode with activation
    checkpointing when asked; the model's flags, mode and cache setting restored afterwards."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if checkpointing:
            _checkpointing(model, True)
            model.train()  # transformers checkpoints only in training mode (dropout is 0 in these models)
        yield
    finally:
        if checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for p, flag in frozen.items():
            p.requires_grad_(flag)
            p.grad = None


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
    n, total_loss = input_ids.shape[0], 0.0
    with _frozen(model, checkpointing):
        acc = _Accumulator(params, second_order)
        try:
            if input_stats:
                acc.hook_inputs(lm, layers)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            start, desc = time.perf_counter(), "taylor gradients" if backward else "taylor statistics"
            for k in tqdm(range(n), desc=desc, unit="sample"):
                ids = input_ids[k:k + 1].to(dev)
                acc.recording = True
                with torch.set_grad_enabled(backward):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                acc.recording = False
                if not torch.isfinite(loss):  # NaN scores would rank every structure at random
                    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                    raise CorruptModelError(
                        f"model '{lm.name}' gives a non-finite loss ({loss.item()}) on calibration "
                        f"sample {k}: its weights are corrupt or overflow in {dtype}")
                if backward:
                    loss.backward()
                total_loss += float(loss.detach())
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        finally:
            acc.remove()
    grad, fisher = acc.means(n)
    return GradientPass(grad, fisher, n, seconds, total_loss / n, peak, acc.stats)
