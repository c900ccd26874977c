"""Layer removal: which decoder layers to drop, and the surgery that drops them.

The layer stage of Flab-Pruner (Yang et al., 2024) and ShortGPT's (Men et al., 2024). Greedy,
one layer at a time, re-scoring the remaining layers after every removal:

    kl       KL(P_orig || P_pruned) of the next-token distributions on calibration
             windows, mean over tokens: Flab-Pruner's objective (default). Each
             step records every layer's input once; leaving out the layer at
             position j re-runs only the layers after it (``_removal_kl``)
    bi       ShortGPT's Block Influence 1 - cos(h_in, h_out), mean over tokens
    bi-last  the same at the last token of each window only (Flab's public code)

``remove_layers_`` deletes layers, renumbers ``layer_idx`` (the KV cache is keyed
by it), and updates ``num_hidden_layers``, ``layer_types`` and, for per-layer
checkpoints, ``per_layer_config``: the result is a plain checkpoint of the same
family (``from_pretrained``, ``generate`` with a cache, vLLM).

    from codeprune.methods.depth import choose_layers, remove_layers_
    drop = choose_layers(lm, calib.input_ids, n=4, metric="kl")
    remove_layers_(lm, drop)

The ``layers`` stage of a recipe (recipes/runner.py, docs/recipes.md) calls these:
``codeprune prune --recipe flab`` or ``--recipe shortgpt``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codeprune.errors import ConfigError

LAYER_METRICS = ("kl", "bi", "bi-last")


def _swap_layers(lm, keep: list[int], originals: nn.ModuleList) -> None:
    lm.adapter.set_layers(nn.ModuleList([originals[i] for i in keep]))


@torch.no_grad()
def _reference(lm, input_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, float]]:
    """Per batch: the next-token probabilities P (float32, (B, L, V)) and sum(P log P)."""
    out = []
    for k in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[k:k + batch_size]
        logp = F.log_softmax(lm.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        p = logp.exp()
        out.append((p, float((p * logp).sum())))
    return out


@torch.no_grad()
def block_influence(lm, input_ids: torch.Tensor, *, last_token: bool = False,
                    batch_size: int = 8) -> list[float]:
    """1 - cos(h_in, h_out) of every current decoder layer, mean over tokens (or last tokens)."""
    layers = list(lm.adapter.layers())
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[i] = (h_in, h_out)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for k in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[k:k + batch_size]
            lm.model(input_ids=ids, use_cache=False)
            for i, (h_in, h_out) in captured.items():
                if last_token:
                    h_in, h_out = h_in[:, -1], h_out[:, -1]
                cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                sums[i] += float((1 - cos).sum())
            count += ids.shape[0] * (1 if last_token else ids.shape[1])
            captured.clear()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


@torch.no_grad()
def _removal_kl(lm, keep: list[int], originals: nn.ModuleList, reference: list[tuple[torch.Tensor, float]],
                input_ids: torch.Tensor, batch_size: int) -> dict[int, float]:
    """KL(P_ref || P) of the model made of layers ``keep`` with each one of them left out.

    One forward pass over the current layers records every layer's input (and its
    keyword arguments: masks and position embeddings, per layer since layer types
    may differ); leaving out the layer at position j then only runs the layers after
    it, from the recorded input: half the work of re-running the whole model for
    every candidate."""
    a = lm.adapter
    _swap_layers(lm, keep, originals)
    layers = list(a.layers())
    totals = {c: 0.0 for c in keep}
    count = 0
    for (p, negentropy), k in zip(reference, range(0, input_ids.shape[0], batch_size), strict=True):
        inputs: list[torch.Tensor] = []
        kwargs: list[dict] = []

        def pre(module, args, kw, inputs=inputs, kwargs=kwargs):
            inputs.append(args[0] if args else kw["hidden_states"])
            kwargs.append({key: v for key, v in kw.items() if key != "hidden_states"})

        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
        try:
            a.decoder(input_ids=input_ids[k:k + batch_size], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for j, cand in enumerate(keep):
            h = inputs[j]
            for t in range(j + 1, len(layers)):
                out = layers[t](h, **kwargs[t])
                h = out[0] if isinstance(out, tuple) else out
            logits = a.logits(h).float()
            # sum P (log P - log Q), with log Q = logits - logsumexp(logits) and sum P = 1
            cross = (p * logits).sum(-1) - torch.logsumexp(logits, dim=-1)
            totals[cand] += negentropy - float(cross.sum())
        count += p.shape[0] * p.shape[1]
    return {c: v / count for c, v in totals.items()}


def choose_layers(lm, input_ids: torch.Tensor, n: int, *, metric: str = "kl",
                  batch_size: int = 8) -> list[int]:
    """The ``n`` layers (original indices, in removal order) whose greedy removal changes the
    model least by ``metric``; the model is left as it was."""
    if metric not in LAYER_METRICS:
        raise ConfigError(f"unknown layer metric '{metric}': choose {', '.join(LAYER_METRICS)}")
    total = lm.adapter.num_layers
    if not 0 <= n < total:
        raise ConfigError(f"can remove 0 to {total - 1} of the model's {total} layers, not {n}")
    if input_ids is None or input_ids.shape[0] == 0:
        raise ConfigError("layer removal needs calibration windows")
    originals = lm.adapter.layers()
    keep, chosen = list(range(total)), []
    reference = _reference(lm, input_ids, batch_size) if metric == "kl" else None
    try:
        for _ in tqdm(range(n), desc=f"layers ({metric})", unit="layer"):
            if metric == "kl":
                scores = _removal_kl(lm, keep, originals, reference, input_ids, batch_size)
            else:
                _swap_layers(lm, keep, originals)
                bi = block_influence(lm, input_ids, last_token=metric == "bi-last", batch_size=batch_size)
                scores = dict(zip(keep, bi, strict=True))
            best = min(keep, key=lambda i: (scores[i], i))
            chosen.append(best)
            keep.remove(best)
    finally:
        lm.adapter.set_layers(originals)
    return chosen


def remove_layers_(lm, drop: Iterable[int]) -> list[int]:
    """Delete the decoder layers ``drop`` (original indices) in place; returns the kept ones."""
    a = lm.adapter
    total = a.num_layers
    drop = set(drop)
    if not drop <= set(range(total)):
        raise ConfigError(f"layer indices {sorted(drop - set(range(total)))} out of range 0-{total - 1}")
    keep = [i for i in range(total) if i not in drop]
    if not keep:
        raise ConfigError("cannot remove every layer")
    _swap_layers(lm, keep, a.layers())
    for new, layer in enumerate(a.layers()):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config = lm.model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    if getattr(config, "is_heterogeneous", False):  # the view's serialised form: {"i": {key: value}}
        old = {int(k): v for k, v in (config.to_dict().get("per_layer_config") or {}).items()}
        config.per_layer_config = None
        config.per_layer_config = {new: dict(old.get(i, {})) for new, i in enumerate(keep)}
    return keep
