"""checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from codeprune.outputs import write_atomically

if TYPE_CHECKING:  # loading imports this module
    from codeprune.models.loading import LoadedModel

logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)


MODELING_FILE = "modeling_codeprune.py"


EXTRA_BIAS_KEY = "codeprune_extra_bias"


def needs_modeling_file(config) -> bool:
    """True when plain transformers cannot build the model: per-layer sizes or extra biases."""
    return bool(getattr(config, "is_heterogeneous", False) or getattr(config, EXTRA_BIAS_KEY, None))


def set_auto_map(config) -> None:
    """Point AutoModelForCausalLM at the modeling file when the model needs it."""
    from codeprune.models.pruned_modeling import class_name

    auto_map = dict(getattr(config, "auto_map", None) or {})
    if needs_modeling_file(config):
        auto_map["AutoModelForCausalLM"] = f"{MODELING_FILE[:-3]}.{class_name(config.model_type)}"
        config.auto_map = auto_map
    elif auto_map.get("AutoModelForCausalLM", "").startswith(MODELING_FILE[:-3] + "."):
        del auto_map["AutoModelForCausalLM"]
        config.auto_map = auto_map or None


def save_checkpoint(lm: LoadedModel, out: str | Path, *, overwrite: bool = False,
                    report: dict | None = None, render: Callable[[dict], str] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save model, tokenizer and (optionally) report.json / report.md (``render(report)``) to ``out``;
    ``extra(folder)`` adds more files before the folder is renamed into place.

    When ``report`` has an "efficiency" section, its ``disk_bytes`` is set here to the
    size of the saved checkpoint (weights, config, tokenizer), the one place it is known."""

    def fill(tmp: Path) -> None:
        config = lm.model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        if needs_modeling_file(config):
            from codeprune.models import pruned_modeling

            shutil.copyfile(pruned_modeling.__file__, tmp / MODELING_FILE)
        if report is not None:
            if report.get("efficiency") is not None:
                pass

                report["efficiency"]["disk_bytes"] = disk_bytes(tmp)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            if render is not None:
                (tmp / "report.md").write_text(render(report))
        if extra is not None:
            extra(tmp)

    return write_atomically(out, overwrite, fill)


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the checkpoint's own files in ``folder`` (weights, config, tokenizer, reports);
    sub-folders (a recovery's LoRA ``adapter/``) are not part of what one deploys."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
