"""What every workflow shares: loading a model with its checks, the output check before any
work, and the process's peak memory.

Tests replace ``load_model`` here to hand the workflows a tiny model.
"""

from __future__ import annotations

import functools
import json
import os
import resource
from pathlib import Path

import torch

from codeprune.errors import ConfigError
from codeprune.models.counting import count_parameters
from codeprune.models.dtypes import parse_dtype
from codeprune.models.loading import LoadedModel, load_model
from codeprune.models.offline import OFFLINE_MODELS, cached_folder
from codeprune.outputs import check_output, claims
from codeprune.reporting.provenance import display_name, sanitise_source


def load(model: str, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a model: offline alias, .gguf file, local folder or hub id (see ``codeprune models``)."""
    return load_model(model, dtype=dtype)


def as_loaded(model: str | LoadedModel, dtype, seq_len: int) -> LoadedModel:
    """``model`` itself, or loaded by name; ConfigError when ``seq_len`` exceeds its context."""
    lm = model if isinstance(model, LoadedModel) else load(model, dtype=dtype)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
    return lm


def own_report(lm: LoadedModel, folder: str | Path | None = None) -> dict:
    """The report.json a codeprune checkpoint carries (``folder``, else where ``lm`` was
    loaded from), read leniently: {} when there is none or it cannot be read. For what a
    result says of itself (its base model, how it was pruned), never validated as a schema."""
    folder = folder or lm.origin.get("path")
    try:
        report = json.loads((Path(str(folder)) / "report.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def local_paths(*sources) -> list[Path]:
    """The files and folders on this machine that ``sources`` (model names, data specs) read:
    a folder or file given by path, an offline alias's cache folder; hub ids and built-in
    corpora read nothing the output could overwrite."""
    paths = []
    for src in sources:
        if isinstance(src, LoadedModel) or src is None:
            continue
        src = str(src)
        if src in OFFLINE_MODELS:
            paths.append(cached_folder(src))
            continue
        path = Path(src.split(":", 1)[1] if ":" in src and not Path(src).exists() else src).expanduser()
        if path.exists():
            paths.append(path)
    return paths


def weights_bytes(model, save_dtype: str | None = None) -> int | None:
    """About the bytes of ``model``'s weights once saved in ``save_dtype`` (default: as stored),
    from the files of a local folder or offline cache; None when unknown before loading
    (a hub id, an alias not yet cached, a .gguf file)."""
    folders = [p for p in local_paths(model) if p.is_dir()]
    if not folders:
        return None
    files = [f for pat in ("*.safetensors", "*.bin") for f in folders[0].glob(pat)]
    size = sum(f.stat().st_size for f in files)
    if not size:
        return None
    if save_dtype is not None:
        try:
            config = json.loads((folders[0] / "config.json").read_text())
            stored = parse_dtype(config.get("dtype") or config.get("torch_dtype") or "float32")
        except (OSError, ValueError, ConfigError):
            return size
        size = size * _itemsize(parse_dtype(save_dtype)) // _itemsize(stored)
    return size


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_out(out, overwrite: bool, *reads, expected_bytes: float | None = None, kind: str = "folder"):
    """The output check before any work (outputs.check_output) with the local inputs of ``reads``;
    in a distributed run (torchrun sets RANK) only rank 0, the writer, claims the output."""
    if out is None:
        return None
    return check_output(out, overwrite, inputs=local_paths(*reads), expected_bytes=expected_bytes, kind=kind,
                        claim=os.environ.get("RANK", "0") == "0")


def releasing_outputs(workflow):
    """Decorate a workflow: the outputs it claimed (``check_out``) are released when it returns
    or fails, so a failed run leaves no lock file beside its output."""

    @functools.wraps(workflow)
    def run(*args, **kwargs):
        with claims():
            return workflow(*args, **kwargs)

    return run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prune_header(lm: LoadedModel, *, params_dense: int, calibration, seconds: float, device) -> dict:
    """The fields every prune report starts with (a prune run, a sweep member): the model and its
    source without local paths, parameter counts, the calibration windows (``TokenWindows`` or
    None when no data was used), the pruning time, memory and device."""
    total, nonzero = count_parameters(lm.model)
    calib = None
    if calibration is not None:
        calib = {**calibration.describe(), "source": display_name(calibration.source)}
    return {"model": display_name(lm.name), "source": sanitise_source(lm.origin, lm.name),
            "notes": [lm.origin["note"]] if lm.origin.get("note") else [],
            "params_dense": params_dense, "params_total": total, "params_nonzero": nonzero,
            "calibration": calib, "seconds_prune": seconds, "peak_rss_mb": peak_rss_mb(),
            "device": str(device)}
