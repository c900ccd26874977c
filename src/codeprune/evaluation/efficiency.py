"""Efficiency figures of a model: size, disk, memory, MACs per token, prefill/decode speed, energy.

    >>> efficiency_report(lm, checkpoint="runs/wanda50", device="cpu")
    {"params_total": ..., "params_nonzero": ..., "disk_bytes": ..., "macs_per_token": ...,
     "speed": {"batch_1": {"prefill_tok_s": ..., "decode_tok_s": ...}, "batch_8": {...}}, ...}

MACs are analytic, from the shapes (the same formula for every supported
family): dense MACs are what a dense kernel executes; ``nonzero`` counts only
non-zero weights, what an ideal sparse kernel would execute. Energy comes from
codecarbon in offline mode when it is installed, and is an estimate.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import resource
import time
from pathlib import Path

import torch

from codeprune.models.checkpoint import disk_bytes
from codeprune.models.counting import count_parameters
from codeprune.models.loading import LoadedModel


def macs_per_token(lm: LoadedModel, context: int, *, nonzero: bool = False) -> int:
    """Multiply-accumulates to produce one token's logits with ``context`` tokens attended.

    Linear layers (decoder Linears and lm_head) count in*out each (or their
    non-zero weights with ``nonzero``); attention adds QK^T and AV: 2 * heads *
    head_dim * context per layer (the layer's own head count, after structured
    pruning). Norms, activations and rotary are ignored."""
    a = lm.adapter
    count = (lambda W: int(torch.count_nonzero(W).item())) if nonzero else (lambda W: W.numel())
    macs = count(a.lm_head().weight)
    for layer in a.layers():
        macs += sum(count(lin.weight) for lin in a.linears(layer).values())
        macs += 2 * a.layer_sizes(layer)["heads"] * a.head_dim * context
    return macs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(lm: LoadedModel, *, batch_size: int, prompt_len: int = 128,
                  new_tokens: int = 32, seed: int = 0) -> dict:
    """Prefill and decode throughput (tokens/s) at one batch size, with the KV cache.

    Prefill: one forward over (batch, prompt_len) random tokens. Decode:
    ``new_tokens`` single-token steps from that cache (greedy). Runs where the
    model's parameters are."""
    model = lm.model
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.adapter.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up: allocator, kernels
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (B, 1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - start
    return {"prefill_tok_s": batch_size * prompt_len / prefill,
            "decode_tok_s": batch_size * new_tokens / decode,
            "prompt_len": prompt_len, "new_tokens": new_tokens}


@contextlib.contextmanager
def energy_tracker():
    """Yields a dict filled on exit with codecarbon's offline estimate.

    Empty when codecarbon is not installed or CODEPRUNE_ENERGY=0 (the test suite
    sets it: starting a tracker costs about 3 s). The figures are estimates: on a
    CPU without RAPL counters codecarbon assumes a power draw from the CPU model."""
    result: dict = {}
    try:
        if os.environ.get("CODEPRUNE_ENERGY", "1") == "0":
            raise ImportError
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.emissions_tracker import BaseEmissionsTracker
    except ImportError:
        yield result
        return
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    # no emissions.csv: `output_methods=[]` where codecarbon has it (3.3 deprecates save_to_*)
    quiet = ({"output_methods": []} if "output_methods" in inspect.signature(BaseEmissionsTracker).parameters
             else {"save_to_file": False})
    tracker = OfflineEmissionsTracker(country_iso_code="USA", log_level="error", **quiet)
    tracker.start()
    try:
        yield result
    finally:
        co2_kg = tracker.stop()
        data = tracker.final_emissions_data
        result.update({"kwh": getattr(data, "energy_consumed", None), "co2_kg": co2_kg,
                       "estimate": True, "tool": "codecarbon (offline, country USA)"})


def peak_memory_mb(device: torch.device) -> float:
    """Max CUDA memory allocated on a GPU; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def efficiency_report(lm: LoadedModel, *, checkpoint: str | Path | None = None,
                      batch_sizes: tuple[int, ...] = (1, 8), prompt_len: int = 128,
                      new_tokens: int = 32) -> dict:
    """Every efficiency figure of ``lm`` (see the module docstring)."""
    device = next(lm.model.parameters()).device
    total, nonzero = count_parameters(lm.model)
    with energy_tracker() as energy:
        speed = {f"batch_{b}": measure_speed(lm, batch_size=b, prompt_len=prompt_len,
                                              new_tokens=new_tokens) for b in batch_sizes}
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "bytes_in_memory": sum(p.numel() * p.element_size() for p in lm.model.parameters()),
        "disk_bytes": disk_bytes(checkpoint) if checkpoint else None,
        "macs_per_token": macs_per_token(lm, prompt_len),
        "macs_per_token_nonzero": macs_per_token(lm, prompt_len, nonzero=True),
        "macs_context": prompt_len,
        "speed": speed,
        "peak_memory_mb": peak_memory_mb(device),
        "energy": energy or None,
        "device": str(device),
    }
