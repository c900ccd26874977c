"""Write a pruned model as a plain Hugging Face checkpoint, atomically.

Unstructured / N:M results keep every shape, so the folder is a standard
checkpoint (safetensors, config, tokenizer, generation config) that plain
``AutoModelForCausalLM.from_pretrained`` loads and vLLM serves. So are uniform
structured results. Structured results whose layers differ (``per_layer_config``)
or that carry biases the architecture has no flag for also get
``modeling_codeprune.py`` (models/pruned_modeling.py) beside the weights, for
``from_pretrained(path, trust_remote_code=True)``. Everything is
written into a hidden temporary folder beside the target and renamed into
place at the end: an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from codeprune.errors import OutputExistsError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output (before any work is done) unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a folder")
        if not overwrite:
            raise OutputExistsError(f"output folder {out} exists: pass --overwrite to replace it")
    return out


def write_atomically(out: str | Path, overwrite: bool, fill) -> Path:
    """Call ``fill(tmp_folder)`` then move the folder to ``out`` (replacing it if allowed)."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
