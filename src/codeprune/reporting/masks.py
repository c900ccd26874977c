"""Pruning masks: compact storage and Jaccard distance (as in Puccioni et al.).

A mask is True where a weight is pruned (zero). Masks are keyed by
``"{layer}.{sublayer}"`` (e.g. ``"3.q_proj"``), so runs of different folders and
architectures of one family compare by position, not by module path.

    masks = model_masks(lm)                       # {"0.q_proj": BoolTensor[out, in], ...}
    save_masks("runs/langs/python/masks.safetensors", masks)   # 1 bit per weight
    jaccard(load_masks(a), load_masks(b))["model"]

Jaccard distance of two masks A, B: 1 - |A ∩ B| / |A ∪ B| (0: identical, 1: disjoint).
Pooled figures (per sublayer type, per layer, whole model) sum the intersections
and unions of their members before dividing: a large Linear weighs more.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from codeprune.errors import CorruptModelError
from codeprune.models.adapters.base import DecoderAdapter

FORMAT = "codeprune-masks-v1"


def decoder_linears(lm) -> dict[str, torch.nn.Linear]:
    """{"layer.sublayer": Linear} for every decoder-layer Linear of ``lm`` (the mask keys)."""
    return {f"{i}.{name}": lin for i, layer in enumerate(lm.adapter.layers())
            for name, lin in lm.adapter.linears(layer).items()}


def model_masks(lm) -> dict[str, torch.Tensor]:
    """{"layer.sublayer": weight == 0} for every decoder-layer Linear of ``lm``."""
    return {k: (lin.weight.detach() == 0).cpu() for k, lin in decoder_linears(lm).items()}


def save_masks(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    """Bit-packed (numpy.packbits, 8 weights a byte) safetensors; shapes in the metadata."""
    packed = {k: np.packbits(m.numpy().reshape(-1)) for k, m in masks.items()}
    shapes = {k: list(m.shape) for k, m in masks.items()}
    save_file(packed, str(path), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; a mask is as shareable as a report


@dataclass(frozen=True)
class PackedMask:
    """A mask kept bit-packed (8 weights a byte): what ``compare`` holds in memory."""

    bits: np.ndarray  # uint8, numpy.packbits of the flattened mask (zero padding)
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> PackedMask:
        return cls(np.packbits(mask.numpy().reshape(-1)), tuple(mask.shape))


def load_masks(path: str | Path, *, packed: bool = False) -> dict:
    """{key: BoolTensor} (or {key: PackedMask} with ``packed``) from a mask file."""
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CorruptModelError(f"{path} is not a codeprune mask file")
        shapes = json.loads(meta["shapes"])
        packed_bits = load_file(str(path))
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise CorruptModelError(f"cannot read masks from {path}: {e}") from e
    if packed:
        return {k: PackedMask(packed_bits[k], tuple(shape)) for k, shape in shapes.items()}
    out = {}
    for k, shape in shapes.items():
        n = int(np.prod(shape))
        out[k] = torch.from_numpy(np.unpackbits(packed_bits[k], count=n).astype(bool).reshape(shape))
    return out


def _split_key(key: str) -> tuple[int, str]:
    layer, sub = key.split(".", 1)
    return int(layer), sub


def overlap_counts(a: torch.Tensor | PackedMask, b: torch.Tensor | PackedMask) -> tuple[int, int]:
    """(|A ∩ B|, |A ∪ B|) of two masks of one shape (boolean tensors or packed bits)."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(a, PackedMask) or isinstance(b, PackedMask):
        a = a if isinstance(a, PackedMask) else PackedMask.of(a)
        b = b if isinstance(b, PackedMask) else PackedMask.of(b)
        return (int(np.bitwise_count(a.bits & b.bits).sum(dtype=np.int64)),
                int(np.bitwise_count(a.bits | b.bits).sum(dtype=np.int64)))
    return int((a & b).sum()), int((a | b).sum())


def _distance(inter: int, union: int) -> float:
    return 1.0 - inter / union if union else 0.0


def jaccard_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - |A ∩ B| / |A ∪ B| of two boolean masks (True = pruned); 0 for two empty masks."""
    return _distance(*overlap_counts(a, b))


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Jaccard distances of two runs' masks: {"model", "per_type", "per_layer", "per_sublayer"}.

    per_type: {sublayer: d} pooled over layers; per_layer: [d per layer] pooled over
    sublayers; per_sublayer: {layer: {sublayer: d}}. Keys present in only one run
    are an error (compare runs of the same model)."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"the runs' masks cover different modules, e.g. {missing[0]}: same model?")
    by_type: dict[str, list[int]] = {}
    by_layer: dict[int, list[int]] = {}
    per_sublayer: dict[int, dict[str, float]] = {}
    total = [0, 0]
    for key in sorted(a, key=_split_key):
        layer, sub = _split_key(key)
        i, u = overlap_counts(a[key], b[key])
        for acc in (by_type.setdefault(sub, [0, 0]), by_layer.setdefault(layer, [0, 0]), total):
            acc[0] += i
            acc[1] += u
        per_sublayer.setdefault(layer, {})[sub] = _distance(i, u)
    known = DecoderAdapter.sublayer_names  # the Llama layout's order; other names follow, sorted
    order = [s for s in known if s in by_type] + sorted(set(by_type) - set(known))
    return {
        "model": _distance(*total),
        "per_type": {s: _distance(*by_type[s]) for s in order},
        "per_layer": [_distance(*by_layer[k]) for k in sorted(by_layer)],
        "per_sublayer": {str(k): v for k, v in sorted(per_sublayer.items())},
    }
