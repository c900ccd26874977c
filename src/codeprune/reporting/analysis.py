"""Many runs side by side.

- ``compare_runs``: pruning-mask Jaccard distances between runs (per sublayer type,
  per layer, whole model) and the calibration-language x evaluation-language
  perplexity matrix, as compare.json / compare.md / heatmaps.
- ``report_runs``: one table over many run folders (prune, eval, recover or sweep
  members) as runs.json / report.md, and plots of perplexity and speed against compression.

    codeprune compare runs/langs          # a sweep folder stands for its members
    codeprune report runs/wanda50 runs/langs/python --out runs/report

A run is a folder with a report.json, read through the schema (reporting/schema.py:
a report of another schema version is refused with a clear error). Its masks come from masks.safetensors
(written by ``sweep``) or, failing that, from the zeros of its checkpoint.
Output folders are derived views: one that holds our own marker file
(compare.json / runs.json) is replaced; any other existing folder needs ``overwrite``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from codeprune.errors import ConfigError, CorruptModelError, OutputExistsError
from codeprune.models.loading import load_model
from codeprune.outputs import write_atomically
from codeprune.reporting.markdown import render_compare, render_runs
from codeprune.reporting.masks import PackedMask, jaccard, load_masks, model_masks
from codeprune.reporting.schema import (
    Efficiency,
    EvalReport,
    PerplexityScore,
    PruneReport,
    RecoverReport,
    Report,
    SweepReport,
)
from codeprune.reporting.writer import read_report

__all__ = ["compare_runs", "default_out", "read_runs", "render_compare", "render_runs", "report_runs"]


@dataclass
class Run:
    path: Path
    report: Report
    label: str = ""  # how tables and plots name it: the calibration language or the folder


def _expand(paths: list[str | Path]) -> list[Path]:
    """The paths, with a sweep folder (holding sweep.json) replaced by its member runs."""
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir() and (p / "sweep.json").is_file() and not (p / "report.json").is_file():
            summary = read_report(p / "sweep.json")
            if not isinstance(summary, SweepReport):
                raise CorruptModelError(f"{p / 'sweep.json'} is a {summary.kind} report, not a sweep summary")
            out += [p / m for m in summary.members]
        else:
            out.append(p)
    return out


def read_runs(paths: list[str | Path]) -> tuple[list[Run], list[str]]:
    """(runs, notes on skipped paths). Folders without report.json are skipped."""
    runs, skipped = [], []
    for p in _expand(paths):
        if not p.is_dir():
            if not p.exists():
                raise ConfigError(f"run folder not found: {p}")
            skipped.append(f"{p}: not a folder")
            continue
        if not (p / "report.json").is_file():
            skipped.append(f"{p}: no report.json")
            continue
        report = read_report(p / "report.json")
        if isinstance(report, SweepReport):
            skipped.append(f"{p}: a sweep summary (its members are the runs)")
            continue
        label = report.calibration_language if isinstance(report, PruneReport) else None
        runs.append(Run(p, report, label or p.name))
    if not runs:
        raise ConfigError("no run folders with a report.json among the given paths")
    for depth in range(2, 9):  # one label twice: prefix parent folders until they differ
        labels = [r.label for r in runs]
        dup = {x for x in labels if labels.count(x) > 1}
        if not dup:
            break
        for r in runs:
            if r.label in dup:
                r.label = "/".join(r.path.resolve().parts[-depth:])
    return runs, skipped


def _derived_out(out: str | Path, marker: str, overwrite: bool) -> bool:
    """Whether ``out`` may be replaced: it holds our marker, or ``overwrite`` is set."""
    out = Path(out).expanduser()
    if out.exists() and not (out / marker).is_file() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not a codeprune {marker.split('.')[0]} "
                                "folder: pass --overwrite to replace it")
    return True


def default_out(paths: list[str | Path], name: str) -> Path:
    """``name`` beside the runs: in their common parent folder (never the root folder)."""
    parents = [str(Path(p).expanduser().resolve().parent) for p in paths]
    common = Path(os.path.commonpath(parents))
    if common == Path(common.anchor):
        raise ConfigError(f"the runs share no folder but {common}: give --out")
    return common / name


def run_masks(run: Run) -> dict | None:
    """The run's masks, kept bit-packed (8x less memory than booleans)."""
    if (run.path / "masks.safetensors").is_file():
        return load_masks(run.path / "masks.safetensors", packed=True)
    if (run.path / "config.json").is_file():
        return {k: PackedMask.of(m) for k, m in model_masks(load_model(str(run.path))).items()}
    return None


def _perplexities(report: Report) -> dict[str, PerplexityScore]:
    """Held-out perplexity per source of a prune (sweep member) or eval report."""
    if isinstance(report, (PruneReport, EvalReport)):
        return report.perplexity or {}
    return {}


def ppl_matrix(runs: list[Run]) -> dict | None:
    """{"rows": run labels, "cols": eval languages, "matrix", "dense": {lang: ppl}} or None."""
    cols: list[str] = []
    for r in runs:
        for k, e in _perplexities(r.report).items():
            if (e.language or k) not in cols:
                cols.append(e.language or k)
    if not cols:
        return None
    matrix = []
    for r in runs:
        by_lang = {e.language or k: e.ppl for k, e in _perplexities(r.report).items()}
        matrix.append([by_lang.get(c) for c in cols])
    dense: dict[str, float] = {}
    for r in runs:
        if isinstance(r.report, PruneReport):
            dense.update(r.report.perplexity_dense or {})
    return {"rows": [r.label for r in runs], "cols": cols, "matrix": matrix,
            "dense": {c: dense[c] for c in cols if c in dense}}


def compare_runs(paths: list[str | Path], *, out: str | Path | None = None, overwrite: bool = False,
                 plots: bool = True) -> dict:
    """Mask similarity and cross-language perplexity of runs; written to ``out`` when given."""
    runs, skipped = read_runs(paths)
    if out is not None:
        _derived_out(out, "compare.json", overwrite)
    with_masks = []
    for r in runs:
        m = run_masks(r)
        if m is None:
            skipped.append(f"{r.path}: no masks.safetensors and no checkpoint (not in the mask analysis)")
        else:
            with_masks.append((r, m))
    labels = [r.label for r, _ in with_masks]
    n = len(with_masks)
    model = [[0.0] * n for _ in range(n)]
    pairs = []
    for (i, (ra, ma)), (j, (rb, mb)) in combinations(enumerate(with_masks), 2):
        try:
            d = jaccard(ma, mb)
        except ValueError as e:
            raise ConfigError(f"cannot compare {ra.path} and {rb.path}: {e}") from None
        model[i][j] = model[j][i] = d["model"]
        pairs.append({"a": ra.label, "b": rb.label, **d})
    result: dict = {"kind": "compare", "runs": [{"label": r.label, "path": str(r.path)} for r in runs],
                    "skipped": skipped}
    if pairs:
        types = list(pairs[0]["per_type"])
        layers = len(pairs[0]["per_layer"])
        result["jaccard"] = {
            "labels": labels,
            "model": model,
            "per_type_mean": {t: sum(p["per_type"][t] for p in pairs) / len(pairs) for t in types},
            "per_layer_mean": [sum(p["per_layer"][k] for p in pairs) / len(pairs) for k in range(layers)],
            "per_layer_type_mean": [[sum(p["per_sublayer"][str(k)][t] for p in pairs) / len(pairs)
                                     for t in types] for k in range(layers)],
            "types": types,
            "pairs": pairs,
        }
    result["ppl"] = ppl_matrix(runs)
    if out is not None:
        def fill(tmp: Path) -> None:
            figures = _compare_plots(result, tmp) if plots else []
            result["figures"] = [f.name for f in figures]
            (tmp / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "compare.md").write_text(render_compare(result))

        result["out"] = str(write_atomically(out, True, fill))
    return result


def _compare_plots(result: dict, folder: Path) -> list[Path]:
    from codeprune.reporting.plots import heatmap

    figs = []
    pm = result.get("ppl")
    if pm:
        dense = pm["dense"]
        rel = [[v / dense[c] if v is not None and c in dense else v
                for v, c in zip(row, pm["cols"], strict=True)] for row in pm["matrix"]]
        figs.append(heatmap(pm["matrix"], pm["rows"], pm["cols"], folder / "ppl_matrix.png",
                            title="Perplexity of each sub-model\n(colour: ppl / dense ppl)",
                            xlabel="evaluated on", ylabel="calibrated on", colors=rel, cmap="magma_r",
                            colorbar="ppl / dense ppl" if pm["dense"] else "ppl"))
    jac = result.get("jaccard")
    if jac:
        figs.append(heatmap(jac["model"], jac["labels"], jac["labels"], folder / "jaccard_model.png",
                            title="Mask Jaccard distance (whole model)", fmt="{:.3f}", cmap="Blues"))
        figs.append(heatmap(jac["per_layer_type_mean"], [str(i) for i in range(len(jac["per_layer_mean"]))],
                            jac["types"], folder / "jaccard_layers.png", fmt="{:.2f}", cmap="Blues",
                            title="Mask Jaccard distance per layer and sublayer\n(mean over run pairs)",
                            xlabel="sublayer", ylabel="layer"))
    return figs


def _first_ppl(report: Report) -> tuple[float | None, str | None]:
    for key, e in _perplexities(report).items():
        return e.ppl, key
    return None, None


def _speed(eff: Efficiency | None) -> dict:
    return (eff.speed.get("batch_1") or {}) if eff is not None else {}


def _prune_row(r: PruneReport) -> dict:
    ppl, source = (r.ppl_pruned, r.calibration.source if r.calibration else None) \
        if r.ppl_pruned is not None else _first_ppl(r)
    return {"method": r.method, "pattern": r.pattern or r.structure,
            "calibration": r.calibration_language or (r.calibration.source if r.calibration else None),
            "sparsity": r.sparsity_actual, "params_total": r.params_total, "params_nonzero": r.params_nonzero,
            "params_dense": r.params_dense or r.params_total, "ppl": ppl, "ppl_source": source,
            "ppl_dense": r.ppl_dense, "seconds_prune": r.seconds_prune}


def _eval_row(r: EvalReport) -> dict:
    ppl, source = _first_ppl(r)
    return {"sparsity": r.sparsity, "params_total": r.params_total, "params_nonzero": r.params_nonzero,
            "params_dense": r.params_total, "ppl": ppl, "ppl_source": source,
            "pass@1": r.humaneval.pass_at_1 if r.humaneval else None,
            "humaneval_problems": r.humaneval.n_problems if r.humaneval else None}


def _recover_row(r: RecoverReport) -> dict:
    return {"method": "recover", "sparsity": r.sparsity_after, "params_total": r.params_total,
            "params_dense": r.params_total, "ppl": r.ppl_after}


def run_row(run: Run) -> dict:
    """One row of the runs table; the columns a kind lacks are None."""
    r = run.report
    rows = {"prune": _prune_row, "eval": _eval_row, "recover": _recover_row}
    row = dict.fromkeys(["method", "pattern", "calibration", "sparsity", "params_total", "params_nonzero",
                         "params_dense", "ppl", "ppl_source", "ppl_dense", "pass@1", "humaneval_problems",
                         "seconds_prune"])
    row.update(rows[r.kind](r))
    eff = getattr(r, "efficiency", None)
    speed = _speed(eff)
    nonzero, dense = row["params_nonzero"], row["params_dense"]
    return {"run": run.label, "path": str(run.path), "kind": r.kind, "model": r.model, **row,
            "compression": (1 - nonzero / dense) if nonzero and dense else None,
            "decode_tok_s": speed.get("decode_tok_s"), "prefill_tok_s": speed.get("prefill_tok_s"),
            "disk_mb": eff.disk_bytes / 2**20 if eff is not None and eff.disk_bytes else None}


def report_runs(paths: list[str | Path], *, out: str | Path | None = None, overwrite: bool = False,
                plots: bool = True) -> dict:
    """One table over many runs (and plots), written to ``out`` when given."""
    runs, skipped = read_runs(paths)
    if out is not None:
        _derived_out(out, "runs.json", overwrite)
    result = {"kind": "report", "runs": [run_row(r) for r in runs], "skipped": skipped}
    if out is not None:
        def fill(tmp: Path) -> None:
            figures = _report_plots(result["runs"], tmp) if plots else []
            result["figures"] = [f.name for f in figures]
            (tmp / "runs.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "report.md").write_text(render_runs(result))

        result["out"] = str(write_atomically(out, True, fill))
    return result


def _report_plots(rows: list[dict], folder: Path) -> list[Path]:
    from codeprune.reporting.plots import scatter

    figs = []
    pts = [(r["run"], r["compression"], r["ppl"]) for r in rows if r["ppl"] is not None
           and r["compression"] is not None]
    pts += [(f"dense ({r['model']})", 0.0, r["ppl_dense"]) for r in rows if r["ppl_dense"] is not None][:1]
    if pts:
        figs.append(scatter(pts, folder / "ppl_vs_compression.png", logy=True, ylabel="held-out perplexity",
                            xlabel="compression (fraction of parameters removed or zero)",
                            title="Perplexity vs compression"))
    pts = [(r["run"], r["compression"], r["decode_tok_s"]) for r in rows if r["decode_tok_s"]
           and r["compression"] is not None]
    if pts:
        figs.append(scatter(pts, folder / "speed_vs_compression.png", ylabel="decode tokens/s (batch 1)",
                            xlabel="compression (fraction of parameters removed or zero)",
                            title="Decode speed vs compression"))
    return figs
