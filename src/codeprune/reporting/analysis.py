"""Many runs side by side.

- ``compare_runs``: pruning-mask Jaccard distances between runs (per sublayer type,
  per layer, whole model) and the calibration-language x evaluation-language
  perplexity matrix, as compare.json / compare.md / heatmaps.
- ``report_runs``: one table over many run folders (prune, eval or sweep members)
  as report.json / report.md, and plots of perplexity and speed against compression.

A run is a folder with a report.json. Its masks come from masks.safetensors
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
from codeprune.outputs import write_atomically


@dataclass
class Run:
    path: Path
    report: dict
    label: str = ""  # how tables and plots name it: the calibration language or the folder


def _expand(paths: list[str | Path]) -> list[Path]:
    """The paths, with a sweep folder (holding sweep.json) replaced by its member runs."""
    out = []
    for p in paths:
        p = Path(p).expanduser()
        summary = p / "sweep.json"
        if p.is_dir() and summary.is_file() and not (p / "report.json").is_file():
            try:
                members = json.loads(summary.read_text())["members"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CorruptModelError(f"{summary} is not a codeprune sweep summary: {e}") from e
            out += [p / m for m in members]
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
        rj = p / "report.json"
        if not rj.is_file():
            skipped.append(f"{p}: no report.json")
            continue
        try:
            report = json.loads(rj.read_text())
        except (OSError, ValueError) as e:
            raise CorruptModelError(f"{rj} is not valid JSON: {e}") from e
        if not isinstance(report, dict):
            raise CorruptModelError(f"{rj} is not a codeprune report")
        if report.get("kind") == "sweep":
            skipped.append(f"{p}: a sweep summary (its members are the runs)")
            continue
        runs.append(Run(p, report, report.get("calibration_language") or p.name))
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
    from codeprune.reporting.masks import PackedMask, load_masks, model_masks

    if (run.path / "masks.safetensors").is_file():
        return load_masks(run.path / "masks.safetensors", packed=True)
    if (run.path / "config.json").is_file():
        from codeprune.models.loading import load_model

        return {k: PackedMask.of(m) for k, m in model_masks(load_model(str(run.path))).items()}
    return None


def _lang_of(key: str, entry: dict) -> str:
    return entry.get("language") or key


def ppl_matrix(runs: list[Run]) -> dict | None:
    """{"rows": run labels, "cols": eval languages, "matrix", "dense": {lang: ppl}} or None."""
    cols: list[str] = []
    for r in runs:
        for k, e in (r.report.get("perplexity") or {}).items():
            if _lang_of(k, e) not in cols:
                cols.append(_lang_of(k, e))
    if not cols:
        return None
    matrix = []
    for r in runs:
        by_lang = {_lang_of(k, e): e["ppl"] for k, e in (r.report.get("perplexity") or {}).items()}
        matrix.append([by_lang.get(c) for c in cols])
    dense: dict[str, float] = {}
    for r in runs:
        dense.update(r.report.get("perplexity_dense") or {})
    return {"rows": [r.label for r in runs], "cols": cols, "matrix": matrix,
            "dense": {c: dense[c] for c in cols if c in dense}}


def compare_runs(paths: list[str | Path], *, out: str | Path | None = None, overwrite: bool = False,
                 plots: bool = True) -> dict:
    """Mask similarity and cross-language perplexity of runs; written to ``out`` when given."""
    from codeprune.reporting.masks import jaccard

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


def _f(v, fmt="{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def render_compare(result: dict) -> str:
    lines = ["# codeprune compare", ""]
    lines += ["Runs: " + ", ".join(f"`{r['label']}` ({r['path']})" for r in result["runs"]) + ".", ""]
    pm = result.get("ppl")
    if pm:
        lines += ["## Perplexity: calibration language (rows) x evaluation language (columns)", "",
                  "Held-out perplexity; the best sub-model for each evaluation language is in bold.", ""]
        lines += ["| calibrated on | " + " | ".join(pm["cols"]) + " |", "|---" * (len(pm["cols"]) + 1) + "|"]
        if pm["dense"]:
            lines.append("| dense | " + " | ".join(_f(pm["dense"].get(c)) for c in pm["cols"]) + " |")
        best = [min((row[j] for row in pm["matrix"] if row[j] is not None), default=None)
                for j in range(len(pm["cols"]))]
        for label, row in zip(pm["rows"], pm["matrix"], strict=True):
            cells = [f"**{_f(v)}**" if v is not None and v == best[j] else _f(v) for j, v in enumerate(row)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        own = [(j, c) for j, c in enumerate(pm["cols"]) if c in pm["rows"]]
        if own:
            wins = sum(pm["matrix"][pm["rows"].index(c)][j] == best[j] for j, c in own)
            lines += ["", f"The sub-model calibrated on a language is the best on that language in "
                      f"{wins} of {len(own)} languages."]
        lines.append("")
    jac = result.get("jaccard")
    if jac:
        labels = jac["labels"]
        lines += ["## Mask Jaccard distance (1 - |A∩B| / |A∪B|, True = pruned)", "", "Whole model:", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
                  for a, row in zip(labels, jac["model"], strict=True)]
        lines += ["", "Per sublayer type (pooled over layers), mean over run pairs and per pair:", "",
                  "| pair | " + " | ".join(jac["types"]) + " | model |",
                  "|---" * (len(jac["types"]) + 2) + "|",
                  "| **mean** | " + " | ".join(f"{jac['per_type_mean'][t]:.4f}" for t in jac["types"])
                  + f" | {sum(p['model'] for p in jac['pairs']) / len(jac['pairs']):.4f} |"]
        lines += [f"| {p['a']} / {p['b']} | " + " | ".join(f"{p['per_type'][t]:.4f}" for t in jac["types"])
                  + f" | {p['model']:.4f} |" for p in jac["pairs"]]
        per_layer = jac["per_layer_mean"]
        lines += ["", "Per layer (pooled over sublayers, mean over pairs): "
                  + ", ".join(f"{i}: {d:.3f}" for i, d in enumerate(per_layer)) + ".", ""]
    if result.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{f}]({f})" for f in result["figures"]) + ".", ""]
    for s in result.get("skipped", []):
        lines.append(f"- skipped {s}")
    return "\n".join(lines).rstrip() + "\n"


def _primary_ppl(r: dict) -> tuple[float | None, str | None]:
    if r.get("ppl_pruned") is not None:
        return r["ppl_pruned"], (r.get("calibration") or {}).get("source")
    for key, e in (r.get("perplexity") or {}).items():
        return e["ppl"], key
    return None, None


def run_row(run: Run) -> dict:
    r = run.report
    eff = r.get("efficiency") or {}
    speed = (eff.get("speed") or {}).get("batch_1") or {}
    total = r.get("params_total") or eff.get("params_total")
    nonzero = r.get("params_nonzero") or eff.get("params_nonzero")
    dense = r.get("params_dense") or total
    ppl, ppl_source = _primary_ppl(r)
    he = r.get("humaneval") or {}
    return {
        "run": run.label, "path": str(run.path), "kind": r.get("kind", "prune"),
        "model": r.get("model"), "method": r.get("method"), "pattern": r.get("pattern") or r.get("structure"),
        "calibration": r.get("calibration_language") or (r.get("calibration") or {}).get("source"),
        "sparsity": r.get("sparsity_actual", r.get("sparsity")),
        "params_total": total, "params_nonzero": nonzero, "params_dense": dense,
        "compression": (1 - nonzero / dense) if nonzero and dense else None,
        "ppl": ppl, "ppl_source": ppl_source, "ppl_dense": r.get("ppl_dense"),
        "pass@1": he.get("pass@1"), "humaneval_problems": he.get("n_problems"),
        "decode_tok_s": speed.get("decode_tok_s"), "prefill_tok_s": speed.get("prefill_tok_s"),
        "disk_mb": eff["disk_bytes"] / 2**20 if eff.get("disk_bytes") else None,
        "seconds_prune": r.get("seconds_prune"),
    }


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


def render_runs(result: dict) -> str:
    cols = [("run", "{}"), ("model", "{}"), ("method", "{}"), ("pattern", "{}"), ("calibration", "{}"),
            ("sparsity", "{:.3f}"), ("params_nonzero", "{:,}"), ("compression", "{:.3f}"), ("ppl", "{:.3f}"),
            ("ppl_dense", "{:.3f}"), ("pass@1", "{:.3f}"), ("decode_tok_s", "{:.1f}"), ("disk_mb", "{:.1f}")]
    lines = ["# codeprune report", "", "| " + " | ".join(c for c, _ in cols) + " |", "|---" * len(cols) + "|"]
    for row in result["runs"]:
        lines.append("| " + " | ".join("" if row[c] is None else f.format(row[c]) for c, f in cols) + " |")
    lines += ["", "ppl: held-out perplexity on the run's calibration source (prune runs) or its first "
              "evaluation source; compression: 1 - non-zero parameters / dense parameters; decode tok/s at "
              "batch 1.", ""]
    if result.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{f}]({f})" for f in result["figures"]) + ".", ""]
    for s in result.get("skipped", []):
        lines.append(f"- skipped {s}")
    return "\n".join(lines).rstrip() + "\n"
