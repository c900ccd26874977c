"""loading."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from codeprune.errors import CorruptModelError, ModelNotFoundError
from codeprune.models.adapters import get_adapter
from codeprune.models.adapters.base import DecoderAdapter
from codeprune.models.offline import (
    OFFLINE_MODELS,
    SOURCE_FILE,
    _gguf_cache,
    ensure_cached,
)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and architecture adapter."""

    model: nn.Module
    tokenizer: object
    adapter: DecoderAdapter
    name: str  # what the user asked for
    origin: dict = field(default_factory=dict)  # kind, path, and a note on quantized sources

    @property
    def config(self):
        return self.model.config


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(name: str) -> tuple[str, Path | str]:
    """(kind, location) for a model name; kind is alias, gguf, folder or hub."""
    if name in OFFLINE_MODELS:
        return "alias", name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {name}")
        return "gguf", path
    if path.is_dir():
        return "folder", path
    if path.exists():
        raise ModelNotFoundError(f"not a model folder or .gguf file: {name}")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"model folder not found: {name}")
    return "hub", name


def load_model(name: str, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load ``name`` (offline alias, .gguf file, folder or hub id) on the CPU.

    Raises ModelNotFoundError, ModelNotInstalledError, CorruptModelError or
    UnsupportedArchitectureError; never a bare transformers exception."""
    kind, where = resolve(name)
    origin: dict = {"kind": kind}
    if kind == "alias":
        where = ensure_cached(str(where))
    elif kind == "gguf":
        where = _gguf_cache(Path(where))
    if kind in ("alias", "gguf"):
        origin.update(json.loads((Path(where) / SOURCE_FILE).read_text()))
    origin["path"] = str(where)
    model, tokenizer = _from_pretrained(str(where), kind, name, _dtype(dtype))
    adapter = get_adapter(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, origin=origin)


def load_tokenizer(name: str):
    """The tokenizer of ``name`` (alias, .gguf, folder or hub id) without loading weights."""
    from transformers import AutoTokenizer

    kind, where = resolve(name)
    if kind == "alias":
        where = ensure_cached(str(where))
    elif kind == "gguf":
        where = _gguf_cache(Path(where))
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except Exception as e:
        err = CorruptModelError if kind in ("folder", "alias", "gguf") else ModelNotFoundError
        raise err(f"cannot load the tokenizer of '{name}': {_first_line(e)}") from e


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        from codeprune.errors import ConfigError
        raise ConfigError(f"unknown dtype '{dtype}': choose float32, bfloat16 or float16")
    return table[dtype]


def _from_pretrained(where: str, kind: str, name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from codeprune.models.adapters import check_supported

    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as e:
        if kind == "folder":
            raise CorruptModelError(f"cannot read the config in {where}: {_first_line(e)}") from e
        raise ModelNotFoundError(
            f"unknown model '{name}': not an offline alias ({', '.join(OFFLINE_MODELS)}), "
            f"a folder or a .gguf file, and the hub could not provide it ({_first_line(e)})"
        ) from e
    check_supported(config)  # fail before reading gigabytes of weights
    from codeprune.models.checkpoint import needs_modeling_file

    loader = AutoModelForCausalLM
    if needs_modeling_file(config):  # a structurally pruned checkpoint (per-layer sizes, extra biases)
        from codeprune.models.pruned_modeling import model_class

        loader = model_class(config.model_type)
    try:
        model = loader.from_pretrained(where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise CorruptModelError(f"cannot load model '{name}': {_first_line(e)}") from e
    model.eval()
    return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
