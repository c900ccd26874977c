"""Language-specific sub-models (Puccioni et al., ALGORITHMS.md §1): one pruning per calibration language.

    codeprune sweep --model qwen2.5-coder-0.5b --method wanda --sparsity 0.5 \\
        --calib-langs python,java,cpp,javascript --out runs/langs

The model is loaded once and its dense decoder weights kept aside; for each
calibration language the weights are restored, pruned with windows of that
language only, and the sub-model is scored on the held-out split of every
evaluation language (windows built once and shared). Output:

    runs/langs/sweep.json            the perplexity matrix and the settings
    runs/langs/<lang>/report.json    one run per calibration language (``codeprune report`` reads them)
    runs/langs/<lang>/masks.safetensors   its mask, 1 bit per weight
    runs/langs/<lang>/model.safetensors   ... and the sub-model itself with --save-models
    runs/langs/compare/              masks' Jaccard distances, ppl matrix, heatmaps (``codeprune compare``)
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import calibration_windows, heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.data.sources import code_corpora
from codeprune.errors import ConfigError
from codeprune.evaluation.efficiency import efficiency_report
from codeprune.evaluation.perplexity import perplexity, protocol
from codeprune.methods import is_structured, make_pruner, run_method
from codeprune.models.checkpoint import disk_bytes
from codeprune.models.counting import count_parameters, linear_sparsity
from codeprune.models.loading import LoadedModel
from codeprune.outputs import check_output, write_atomically
from codeprune.reporting.markdown import render_markdown
from codeprune.reporting.masks import decoder_linears, model_masks, save_masks

DEFAULT_LANGS = "python,java,cpp,javascript"


def parse_languages(text: str | list[str]) -> dict[str, str]:
    """{language: source spec} from "python,java" (corpora found by ``code_corpora``)
    or "python=python-stdlib,java=java:~/src/jdk" (explicit sources), or a mix."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise ConfigError("no languages given: e.g. --calib-langs python,java")
    found = None
    langs: dict[str, str] = {}
    for item in items:
        if "=" in item:
            name, spec = (s.strip() for s in item.split("=", 1))
            if not name or not spec:
                raise ConfigError(f"bad language entry '{item}': use NAME or NAME=SOURCE")
        else:
            found = found if found is not None else code_corpora()
            name = item
            if name not in found:
                have = ", ".join(found) or "none"
                raise ConfigError(f"no {name} corpus found on this machine (found: {have}); "
                                  f"give one as {name}=LANG:DIR")
            spec = found[name]
        if not re.fullmatch(r"[A-Za-z0-9_+.-]+", name) or name in (".", "..", "compare"):
            raise ConfigError(f"bad language name '{name}': letters, digits and _+.- only "
                              "(it names a folder; 'compare' is taken)")
        if name in langs:
            raise ConfigError(f"language '{name}' given twice")
        langs[name] = spec
    return langs


def sweep(model: str | LoadedModel, method: str = "wanda", *, out: str | Path, sparsity: float = 0.5,
          pattern: str = "unstructured", calib_langs: str | list[str] = DEFAULT_LANGS,
          eval_langs: str | list[str] | None = None, samples: int = 64, seq_len: int = 512, seed: int = 0,
          eval_windows: int = 32, device: str = "cpu", batch_size: int = 8, text_field: str = "text",
          save_models: bool = False, efficiency: bool = True, compare: bool = True, overwrite: bool = False,
          dtype: str | torch.dtype = "float32", **method_options) -> dict:
    """Prune ``model`` once per calibration language and score every sub-model on every
    evaluation language (default: the calibration languages). Returns sweep.json's content."""
    from codeprune.workflows.common import _as_loaded

    if is_structured(method):
        raise ConfigError(f"the language sweep compares masks of the same shapes: '{method}' is structured "
                          "(use an unstructured method, or run `codeprune prune` once per language)")
    pruner = make_pruner(method, sparsity=sparsity, pattern=pattern, **method_options)
    if not pruner.uses_data:
        raise ConfigError(f"method '{method}' uses no calibration data: a language sweep needs one that does")
    calib = parse_languages(calib_langs)
    evals = parse_languages(eval_langs) if eval_langs else dict(calib)
    check_output(out, overwrite)
    check_window_sizes(samples, seq_len)
    check_window_sizes(eval_windows, seq_len)
    dev = resolve_device(device)
    specs = dict.fromkeys([*calib.values(), *evals.values()])
    corpora = {spec: read_source(spec, text_field=text_field) for spec in specs}  # fail fast
    lm = _as_loaded(model, dtype, seq_len)
    place_model(lm, dev)
    tok = lm.tokenizer
    held = {lang: heldout_windows(tok, corpora[spec], seq_len=seq_len, max_windows=eval_windows)
            for lang, spec in evals.items()}
    calib_sets = {lang: calibration_windows(tok, corpora[spec], samples=samples, seq_len=seq_len, seed=seed)
                  for lang, spec in calib.items()}
    linears = decoder_linears(lm)
    dense_weights = {k: lin.weight.detach().to("cpu", copy=True) for k, lin in linears.items()}
    params_dense = count_parameters(lm.model)[0]

    def score_all(tag: str) -> dict[str, dict]:
        return {lang: {**perplexity(lm, w, desc=f"ppl {tag} on {lang}"), "language": lang,
                       "source": evals[lang], "protocol": protocol(w)} for lang, w in held.items()}

    dense = {lang: s["ppl"] for lang, s in score_all("dense").items()}
    summary = {
        "kind": "sweep", "model": lm.name, "method": pruner.name, "pattern": pruner.config.pattern,
        "sparsity": pruner.config.sparsity, "calib_languages": calib, "eval_languages": evals,
        "samples": samples, "seq_len": seq_len, "seed": seed, "eval_windows": eval_windows,
        "ppl_dense": dense, "ppl_matrix": {}, "members": [],
    }

    def fill(tmp: Path) -> None:
        for lang in calib:
            with torch.no_grad():
                for k, lin in linears.items():
                    lin.weight.copy_(dense_weights[k])
            start = time.perf_counter()
            ids = calib_sets[lang].input_ids
            pruned = run_method(lm, pruner, ids, device=dev, batch_size=batch_size).pruned
            seconds = time.perf_counter() - start
            scores = score_all(f"{lang}-calibrated")
            actual, _ = linear_sparsity(lm.model, pruned)
            total, nonzero = count_parameters(lm.model)
            report = {
                "kind": "sweep-member", "model": lm.name, "method": pruner.name,
                "pattern": pruner.config.pattern, "sparsity_target": pruner.config.sparsity,
                "sparsity_actual": actual, "calibration_language": lang,
                "calibration": {**calib_sets[lang].describe(), "text_field": text_field},
                "params_total": total, "params_nonzero": nonzero, "params_dense": params_dense,
                "perplexity": scores, "perplexity_dense": dense,
                "ppl_pruned": scores[lang]["ppl"] if lang in scores else None,
                "ppl_dense": dense.get(lang), "seconds_prune": seconds, "device": str(dev),
                "method_options": dict(vars(pruner.config)), "source": lm.origin,
            }
            if efficiency:
                report["efficiency"] = efficiency_report(lm)
            member = tmp / lang
            member.mkdir()
            save_masks(member / "masks.safetensors", model_masks(lm))
            if save_models:
                lm.model.save_pretrained(member)
                tok.save_pretrained(member)
            if report.get("efficiency"):
                report["efficiency"]["disk_bytes"] = disk_bytes(member) if save_models else None
            (member / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (member / "report.md").write_text(render_markdown(report))
            summary["ppl_matrix"][lang] = {e: s["ppl"] for e, s in scores.items()}
            summary["members"].append(lang)
        (tmp / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")

    try:
        path = write_atomically(out, overwrite, fill)
    finally:
        with torch.no_grad():  # hand the model back dense
            for k, lin in linears.items():
                lin.weight.copy_(dense_weights[k])
    summary["out"] = str(path)
    if compare:
        from codeprune.reporting.analysis import compare_runs

        try:
            summary["compare"] = compare_runs([path / lang for lang in calib], out=path / "compare")["out"]
        except Exception as e:  # the sweep itself is saved: say so rather than lose it
            print(f"codeprune: warning: the sweep is saved in {path}, but comparing its runs failed "
                  f"({type(e).__name__}: {e}); run `codeprune compare {path}`", file=sys.stderr)
            summary["compare"] = None
    return summary
