"""Load a model by name into a ``LoadedModel``: an offline alias, a .gguf file, a folder or a hub id.

    lm = load_model("smollm2-135m")      # lm.origin: {"kind": "alias", "base_model": "HuggingFaceTB/...",
                                         #             "license": "apache-2.0", "dtype": "bfloat16", ...}
    lm = load_model("runs/wanda50", dtype="bfloat16")

``origin`` records where the weights came from and what a checkpoint made from
them carries: the base model (a hub id), its license where known (offline alias
metadata, GGUF metadata, a folder's README front matter, the hub's README), the
family's ``model_type``, and ``dtype``, the source's own precision (the default of
``save_checkpoint``; bfloat16 for dequantized GGUF weights, which load as float32).

A hub id fails at once, in one line, when the hub cannot serve it: with
HF_HUB_OFFLINE set, unless the Hugging Face cache holds it (then it loads from
there); otherwise one quiet probe per process (a TCP connect to the HF_ENDPOINT
host, or the HTTPS proxy, bounded at 1.5 s DNS included) decides whether there is
a network, instead of huggingface_hub's minute of retries.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch

from codeprune.errors import CorruptModelError, ModelNotFoundError
from codeprune.models.adapters import check_supported, get_adapter
from codeprune.models.checkpoint import needs_modeling_file, pruned_model_class
from codeprune.models.dtypes import DEQUANTIZED_DTYPE, config_dtype, parse_dtype
from codeprune.models.loaded import LoadedModel
from codeprune.models.offline import (
    OFFLINE_MODELS,
    SOURCE_FILE,
    drop_gguf_names,
    ensure_cached,
    gguf_cache,
)

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
    local_only = kind == "hub" and hub_local_only(name)
    if kind == "alias":
        where = ensure_cached(str(where))
    elif kind == "gguf":
        where = gguf_cache(Path(where))
    with _hub_offline(local_only):
        origin.update(_source_metadata(kind, name, Path(where) if kind != "hub" else None, local_only))
        origin["path"] = str(where)
        model, tokenizer, source_dtype = _from_pretrained(str(where), kind, name, parse_dtype(dtype),
                                                          local_only)
    origin["model_type"] = model.config.model_type
    origin.setdefault("dtype", source_dtype)
    adapter = get_adapter(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, origin=origin)


def load_tokenizer(name: str):
    """The tokenizer of ``name`` (alias, .gguf, folder or hub id) without loading weights."""
    from transformers import AutoTokenizer

    kind, where = resolve(name)
    local_only = kind == "hub" and hub_local_only(name)
    if kind == "alias":
        where = ensure_cached(str(where))
    elif kind == "gguf":
        where = gguf_cache(Path(where))
    try:
        with _hub_offline(local_only):
            return AutoTokenizer.from_pretrained(str(where), local_files_only=local_only)
    except Exception as e:
        err = CorruptModelError if kind in ("folder", "alias", "gguf") else ModelNotFoundError
        raise err(f"cannot load the tokenizer of '{name}': {_first_line(e)}") from e


def gguf_tokenizer(path: str | Path):
    """The tokenizer a .gguf file describes, read from its metadata alone (no weights, no cache):
    what llama.cpp runs it with, as transformers builds it."""
    from transformers import PreTrainedTokenizerFast  # not Auto: it needs a config class for the arch (deci)

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"no such .gguf file: {path}")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CorruptModelError(f"cannot read the tokenizer of {path}: {_first_line(e)}") from e


def _source_metadata(kind: str, name: str, folder: Path | None, local_only: bool = False) -> dict:
    """What ``origin`` knows about the source before loading weights: a dequantized cache's
    record (alias / .gguf, or a cache folder given by path), else a folder's README front matter,
    else the hub's; ``base_model`` is a hub id or absent (never a local path)."""
    marker = folder / SOURCE_FILE if folder is not None else None
    if marker is not None and marker.is_file():  # weights dequantized from a GGUF file
        info = json.loads(marker.read_text())
        spec = OFFLINE_MODELS.get(info.get("alias", ""))
        if spec is not None:  # the alias's own metadata wins over an older cache record
            info.update(base_model=spec.upstream, license=spec.license)
        return {k: v for k, v in info.items() if v is not None} | {"dtype": DEQUANTIZED_DTYPE}
    meta = _front_matter(folder / "README.md") if folder is not None else _hub_front_matter(name, local_only)
    base = meta.get("base_model")
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    if kind == "hub":
        base = name
    out = {"base_model": base if isinstance(base, str) else None, "license": meta.get("license")}
    return {k: v for k, v in out.items() if v is not None}


def _front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (README.md), or {} when there is none."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _hub_front_matter(repo_id: str, local_only: bool = False) -> dict:
    """The front matter of a hub model's README (from the HF cache when offline), or {}."""
    try:
        from huggingface_hub import hf_hub_download

        return _front_matter(Path(hf_hub_download(repo_id, "README.md", local_files_only=local_only)))
    except Exception:  # no README, no network, a gated repo: the card just names no license
        return {}


def _from_pretrained(where: str, kind: str, name: str, dtype: torch.dtype, local_only: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
    except Exception as e:
        if kind == "folder":
            raise CorruptModelError(f"cannot read the config in {where}: {_first_line(e)}") from e
        raise ModelNotFoundError(
            f"unknown model '{name}': not an offline alias ({', '.join(OFFLINE_MODELS)}), "
            f"a folder or a .gguf file, and the hub could not provide it ({_first_line(e)})"
        ) from e
    check_supported(config)  # fail before reading gigabytes of weights
    source_dtype = config_dtype(config)  # loading in ``dtype`` overwrites config.dtype

    loader = AutoModelForCausalLM
    if needs_modeling_file(config):  # a structurally pruned checkpoint (per-layer sizes, extra biases)
        loader = pruned_model_class(config)
    try:
        model = loader.from_pretrained(where, dtype=dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except Exception as e:
        raise CorruptModelError(f"cannot load model '{name}': {_first_line(e)}") from e
    model.eval()
    drop_gguf_names(model.config)  # a cache folder written before codeprune dropped them
    return model, tokenizer, source_dtype


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# --- hub ids without a network --------------------------------------------------------------

_PROBE_TIMEOUT = 1.5  # seconds, DNS included
_REACHABLE: dict[tuple[str, int], bool] = {}  # one probe per host and process


def hub_local_only(name: str) -> bool:
    """Whether hub id ``name`` must load from the Hugging Face cache (offline, or no network);
    ModelNotFoundError at once when it must and the cache does not hold it."""
    what = f"model '{name}' is not an offline alias ({', '.join(OFFLINE_MODELS)}) or a local folder"
    if _env_offline():
        if _in_hub_cache(name):
            return True
        raise ModelNotFoundError(f"{what}, and HF_HUB_OFFLINE is set: the Hugging Face cache does not hold "
                                 "it either (unset HF_HUB_OFFLINE to download it)")
    host, port = _probe_target()
    if hub_reachable(host, port):
        return False
    if _in_hub_cache(name):
        return True
    raise ModelNotFoundError(f"{what}, and the hub cannot be reached ({host}:{port}: no network), nor does "
                             "the Hugging Face cache hold it")


@contextlib.contextmanager
def _hub_offline(on: bool):
    """huggingface_hub's offline mode while loading from its cache: transformers does not pass
    ``local_files_only`` to every lookup (the adapter-config probe), and each would retry."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _env_offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: the loader's own error says more
        return False


def _probe_target() -> tuple[str, int]:
    """(host, port) that a download would connect to first: the HTTPS proxy, else HF_ENDPOINT's host."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(host: str, port: int) -> bool:
    """One TCP connect (DNS included) bounded at _PROBE_TIMEOUT, remembered for the process.

    getaddrinfo has no timeout of its own, so the probe runs in a daemon thread."""
    key = (host, port)
    if key not in _REACHABLE:
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection(key, timeout=_PROBE_TIMEOUT).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True, name="codeprune-hub-probe")
        thread.start()
        thread.join(_PROBE_TIMEOUT)
        _REACHABLE[key] = bool(result and result[0])
    return _REACHABLE[key]
