"""Counting parameters and zeros of a model (tied embeddings once).

    total, nonzero = count_parameters(lm.model)
    decoder_sparsity(lm)                       # share of zeros over every decoder Linear
"""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over unique parameters (tied embeddings counted once)."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def decoder_sparsity(lm) -> float:
    """Share of zeros over every decoder-layer Linear weight of ``lm``."""
    linears = [lin for layer in lm.adapter.layers() for lin in lm.adapter.linears(layer).values()]
    return linear_sparsity(lm.model, linears)[0]


def linear_sparsity(model: nn.Module, linears: list[nn.Linear]) -> tuple[float, dict[str, float]]:
    """(overall sparsity over ``linears``' weights, {module name: sparsity})."""
    names = {id(m): n for n, m in model.named_modules()}
    per_layer, zeros, total = {}, 0, 0
    for lin in linears:
        z = int((lin.weight == 0).sum().item())
        per_layer[names[id(lin)]] = z / lin.weight.numel()
        zeros += z
        total += lin.weight.numel()
    return (zeros / total if total else 0.0), per_layer
