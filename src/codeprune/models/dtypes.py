"""Floating-point dtypes by name: what ``--dtype`` / ``--save-dtype`` accept and config.json records.

    parse_dtype("bf16")               -> torch.bfloat16
    dtype_name(torch.float16)         -> "float16"
    config_dtype(config)              -> "bfloat16"  (a source's own dtype; None when it has none)

Dequantized GGUF weights (offline aliases, .gguf files) are loaded in float32,
which is not their source's precision: ``DEQUANTIZED_DTYPE`` is what a checkpoint
made from them is saved in by default.
"""

from __future__ import annotations

import torch

from codeprune.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # the names a checkpoint can be saved in
DEQUANTIZED_DTYPE = "bfloat16"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype; a ConfigError names the choices for an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}': choose {', '.join(SAVE_DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of ``dtype``."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def config_dtype(config) -> str | None:
    """The dtype a config says its weights are in (transformers 5 reads an older ``torch_dtype``
    into ``dtype``), or None when it names none or one codeprune does not save in."""
    value = getattr(config, "dtype", None)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in SAVE_DTYPES else None


def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively: a CUDA device that supports them,
    or a CPU with AVX512-BF16 or AMX (oneDNN uses them; elsewhere bfloat16 on a CPU is emulated
    and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
