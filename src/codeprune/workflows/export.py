"""Export a model to GGUF for llama.cpp / ollama (``codeprune export``), with an ollama Modelfile.

    codeprune export runs/q-flap-20 --gguf runs/q-flap-20.gguf --type q8_0
    ollama create q-flap-20 -f runs/q-flap-20.Modelfile

Steps: check the type and both outputs (the .gguf and the Modelfile beside it) before
loading; load the run (or any model name); plan the export (models/gguf_export.py:
llama.cpp architecture, pre-tokenizer, types), which refuses what llama.cpp cannot run
in one line; write the GGUF atomically, then the Modelfile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from codeprune.errors import ConfigError
from codeprune.models.gguf_export import (
    FFN_MULTIPLE,
    ExportPlan,
    check_options,
    export_gguf,
    modelfile_text,
    plan_export,
)
from codeprune.models.loading import LoadedModel
from codeprune.models.offline import source_gguf_kv
from codeprune.outputs import write_file_atomically
from codeprune.workflows.common import check_out, load, own_report, releasing_outputs


@dataclass
class ExportResult:
    gguf: Path
    modelfile: Path | None
    plan: ExportPlan
    seconds: float
    bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        p = self.plan
        return {"gguf": str(self.gguf), "modelfile": str(self.modelfile) if self.modelfile else None,
                "architecture": p.arch, "type": p.qtype, "per_layer": p.per_layer, "pre_tokenizer": p.pre,
                "fallbacks": dict(p.fallbacks), "padded_channels": p.padded_channels, "bytes": self.bytes,
                "seconds": self.seconds,
                "notes": self.notes}


def modelfile_path(gguf: str | Path) -> Path:
    """``runs/q-flap-20.gguf`` -> ``runs/q-flap-20.Modelfile``."""
    gguf = Path(gguf)
    return gguf.with_name(gguf.name.removesuffix(".gguf") + ".Modelfile")


def check_gguf_outputs(gguf: str | Path, overwrite: bool, *reads, modelfile: bool = True) -> None:
    """The output checks of an export, before any work: a .gguf name, its folder, the Modelfile."""
    if not str(gguf).endswith(".gguf"):
        raise ConfigError(f"--gguf must name a .gguf file: {gguf}")
    check_out(gguf, overwrite, *reads, kind="file")
    if modelfile:
        check_out(modelfile_path(gguf), overwrite, *reads, kind="file")


def preflight(lm: LoadedModel, gguf_type: str) -> None:
    """Refuse, before pruning, an export the model already rules out (``prune --gguf``): no
    llama.cpp architecture, rope scaling, a tokenizer llama.cpp cannot be given."""
    plan_export(lm, gguf_type)


def _base_name(model, lm: LoadedModel) -> str:
    """The model a run was pruned from (its report.json names it), else the model itself."""
    return own_report(lm, lm.origin.get("path") or model).get("model") or str(model)


def export_loaded(lm: LoadedModel, gguf: str | Path, *, gguf_type: str = "f16", overwrite: bool = False,
                  modelfile: bool = True, base: str | None = None,
                  ffn_multiple: int = FFN_MULTIPLE) -> ExportResult:
    """Export a model already in memory (``prune --gguf`` calls this after saving)."""
    kv = source_gguf_kv(base) if base else {}
    if kv.get("tokenizer.n_tokens") != len(lm.tokenizer):  # a pruned vocabulary: its own split rule
        kv.pop("tokenizer.ggml.pre", None)
    plan = plan_export(lm, gguf_type, source_metadata=kv, ffn_multiple=ffn_multiple)
    start = time.perf_counter()
    path = export_gguf(lm, gguf, plan=plan, overwrite=overwrite, name=Path(gguf).name.removesuffix(".gguf"))
    seconds = time.perf_counter() - start
    mf = None
    if modelfile:
        text = modelfile_text(lm.tokenizer, path.name)
        mf = write_file_atomically(modelfile_path(path), overwrite, lambda f: f.write(text))
    notes = [f"{name} written as {t} (rows not in 32-value blocks, or the output kept above 4 bits)"
             for name, t in plan.fallbacks.items()]
    if plan.padded_channels:
        notes.append(f"{plan.padded_channels} zero FFN channels added over all layers (widths to a multiple "
                     f"of {ffn_multiple}: the same outputs, llama.cpp's fast kernels, quantizable rows)")
    return ExportResult(path, mf, plan, seconds, path.stat().st_size, notes)


@releasing_outputs
def export(model: str | LoadedModel, gguf: str | Path, *, gguf_type: str = "f16", overwrite: bool = False,
           modelfile: bool = True, ffn_multiple: int = FFN_MULTIPLE) -> ExportResult:
    """Write ``model`` (a run folder, an offline alias, a folder, a hub id) as the GGUF file
    ``gguf`` at ``gguf_type`` (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0), and an ollama
    Modelfile beside it. FFN widths are padded with zero channels to a multiple of
    ``ffn_multiple`` (1: as they are). Unsupported shapes, tokenizers or types are refused
    before any write."""
    check_options(gguf_type, ffn_multiple)
    check_gguf_outputs(gguf, overwrite, model, modelfile=modelfile)
    lm = model if isinstance(model, LoadedModel) else load(model)
    return export_loaded(lm, gguf, gguf_type=gguf_type, overwrite=overwrite, modelfile=modelfile,
                         base=_base_name(model, lm), ffn_multiple=ffn_multiple)
