"""Language-specific sub-models (Puccioni et al.): one pruning per calibration language.

    codeprune sweep --model qwen2.5-coder-0.5b --method wanda --sparsity 0.5 \\
        --calib-langs python,java,cpp,javascript --out runs/langs

The model is loaded once and its dense decoder weights kept aside; for each
calibration language the weights are restored, pruned with windows of that
language only, and the sub-model is scored on the held-out split of every
evaluation language (windows built once and shared). Output:

    runs/langs/sweep.json, sweep.md  the perplexity matrix and the settings (schema kind "sweep")
    runs/langs/<lang>/report.json    one prune run per calibration language (``codeprune report`` reads them)
    runs/langs/<lang>/masks.safetensors   its mask, 1 bit per weight
    runs/langs/<lang>/model.safetensors   ... and the sub-model itself with --save-models (save_checkpoint)
    runs/langs/compare/              masks' Jaccard distances, ppl matrix, heatmaps (``codeprune compare``)
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from functools import partial
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
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.counting import count_parameters
from codeprune.models.loading import LoadedModel
from codeprune.outputs import write_atomically
from codeprune.recipes.runner import method_record
from codeprune.reporting.analysis import compare_runs
from codeprune.reporting.masks import decoder_linears, model_masks, save_masks
from codeprune.reporting.model_card import render_model_card
from codeprune.reporting.provenance import display_name, sanitise_source
from codeprune.reporting.schema import (
    PerplexityScore,
    PruneReport,
    Source,
    SweepReport,
)
from codeprune.reporting.writer import write_report
from codeprune.workflows.common import as_loaded, check_out, prune_header, releasing_outputs, weights_bytes

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


@dataclass
class _Sweep:
    """What every member of one sweep shares: the model, its dense weights, the windows."""

    lm: LoadedModel
    pruner: object
    evals: dict[str, str]  # evaluation language -> source spec
    held: dict  # evaluation language -> held-out windows
    calib_sets: dict  # calibration language -> calibration windows
    linears: dict
    dense_weights: dict
    params_dense: int
    device: object
    batch_size: int
    text_field: str

    def restore_dense(self) -> None:
        with torch.no_grad():
            for k, lin in self.linears.items():
                lin.weight.copy_(self.dense_weights[k])

    def score_all(self, tag: str) -> dict[str, PerplexityScore]:
        return {lang: PerplexityScore(**perplexity(self.lm, w, desc=f"ppl {tag} on {lang}"), language=lang,
                                      source=display_name(self.evals[lang]),
                                      protocol=protocol(w, display_name(w.source)))
                for lang, w in self.held.items()}


def _check(method: str, sparsity: float, pattern: str, method_options: dict):
    """The pruner, refused when a sweep cannot compare its masks or calibrate it."""
    if is_structured(method):
        raise ConfigError(f"the language sweep compares masks of the same shapes: '{method}' is structured "
                          "(use an unstructured method, or run `codeprune prune` once per language)")
    pruner = make_pruner(method, sparsity=sparsity, pattern=pattern, **method_options)
    if not pruner.uses_data:
        raise ConfigError(f"method '{method}' uses no calibration data: a language sweep needs one that does")
    return pruner


def _prepare(model, pruner, calib: dict, evals: dict, *, samples: int, seq_len: int, seed: int,
             eval_windows: int, device: str, batch_size: int, text_field: str, dtype) -> _Sweep:
    """Read the sources (fail fast), load the model once, build every window set once."""
    check_window_sizes(samples, seq_len)
    check_window_sizes(eval_windows, seq_len)
    dev = resolve_device(device)
    specs = dict.fromkeys([*calib.values(), *evals.values()])
    corpora = {spec: read_source(spec, text_field=text_field) for spec in specs}
    lm = as_loaded(model, dtype, seq_len)
    place_model(lm, dev)
    tok = lm.tokenizer
    held = {lang: heldout_windows(tok, corpora[spec], seq_len=seq_len, max_windows=eval_windows)
            for lang, spec in evals.items()}
    calib_sets = {lang: calibration_windows(tok, corpora[spec], samples=samples, seq_len=seq_len, seed=seed)
                  for lang, spec in calib.items()}
    linears = decoder_linears(lm)
    dense_weights = {k: lin.weight.detach().to("cpu", copy=True) for k, lin in linears.items()}
    return _Sweep(lm, pruner, evals, held, calib_sets, linears, dense_weights, count_parameters(lm.model)[0],
                  dev, batch_size, text_field)


def _member(sw: _Sweep, lang: str, dense: dict[str, float], efficiency: bool) -> PruneReport:
    """Prune the dense model with ``lang``'s windows; its report (the model stays pruned)."""
    lm, pruner = sw.lm, sw.pruner
    sw.restore_dense()
    start = time.perf_counter()
    ids = sw.calib_sets[lang].input_ids
    result = run_method(lm, pruner, ids, device=sw.device, batch_size=sw.batch_size)
    seconds = time.perf_counter() - start
    scores = sw.score_all(f"{lang}-calibrated")
    header = prune_header(lm, params_dense=sw.params_dense, calibration=sw.calib_sets[lang], seconds=seconds,
                          device=sw.device)
    header["calibration"]["text_field"] = sw.text_field
    fields = {k: v for k, v in method_record(lm, pruner, result, 0).items()  # masks: no decoder count
              if k != "note"}
    return PruneReport.from_dict(header | fields | {
        "method": pruner.name, "calibration_language": lang,
        "perplexity": {k: v.to_dict() for k, v in scores.items()}, "perplexity_dense": dense,
        "ppl_pruned": scores[lang].ppl if lang in scores else None, "ppl_dense": dense.get(lang),
        "ppl_protocol": scores[lang].protocol if lang in scores else None,
        "efficiency": efficiency_report(lm) if efficiency else None}, "sweep member")


def _save_member(sw: _Sweep, folder: Path, report: PruneReport, save_model: bool,
                 save_dtype: str | None = None) -> None:
    """The member's masks and report (and, with ``save_model``, its checkpoint and model card, the
    weights in ``save_dtype``) in ``folder``."""

    def fill(member: Path) -> None:
        if save_model:
            write_report(member, report, measure_disk=True)  # disk_bytes: the checkpoint's files
        else:
            member.mkdir()
            write_report(member, report)
        save_masks(member / "masks.safetensors", model_masks(sw.lm))

    if save_model:
        save_checkpoint(sw.lm, folder, extra=fill, card=partial(render_model_card, report),
                        save_dtype=save_dtype)
    else:
        fill(folder)


@releasing_outputs
def sweep(model: str | LoadedModel, method: str = "wanda", *, out: str | Path, sparsity: float = 0.5,
          pattern: str = "unstructured", calib_langs: str | list[str] = DEFAULT_LANGS,
          eval_langs: str | list[str] | None = None, samples: int = 64, seq_len: int = 512, seed: int = 0,
          eval_windows: int = 32, device: str = "cpu", batch_size: int = 8, text_field: str = "text",
          save_models: bool = False, efficiency: bool = True, compare: bool = True, overwrite: bool = False,
          dtype: str | torch.dtype = "float32", save_dtype: str | None = None, **method_options) -> dict:
    """Prune ``model`` once per calibration language and score every sub-model on every
    evaluation language (default: the calibration languages). Returns sweep.json's content
    (reporting/schema.py ``SweepReport``) plus "out" and "compare" (the comparison folder)."""
    pruner = _check(method, sparsity, pattern, method_options)
    calib = parse_languages(calib_langs)
    evals = parse_languages(eval_langs) if eval_langs else dict(calib)
    size = weights_bytes(model, save_dtype) if save_models else None
    check_out(out, overwrite, model, *calib.values(), *evals.values(),
              expected_bytes=size * len(calib) if size else None)
    sw = _prepare(model, pruner, calib, evals, samples=samples, seq_len=seq_len, seed=seed,
                  eval_windows=eval_windows, device=device, batch_size=batch_size, text_field=text_field,
                  dtype=dtype)
    dense = {lang: s.ppl for lang, s in sw.score_all("dense").items()}
    summary = SweepReport(
        model=display_name(sw.lm.name), source=Source.from_dict(sanitise_source(sw.lm.origin, sw.lm.name)),
        method=pruner.name, pattern=pruner.config.pattern, sparsity=pruner.config.sparsity,
        calib_languages={k: display_name(v) for k, v in calib.items()},
        eval_languages={k: display_name(v) for k, v in evals.items()}, samples=samples, seq_len=seq_len,
        seed=seed, eval_windows=eval_windows, ppl_dense=dense)

    def fill(tmp: Path) -> None:
        for lang in calib:
            report = _member(sw, lang, dense, efficiency)
            _save_member(sw, tmp / lang, report, save_models, save_dtype)
            summary.ppl_matrix[lang] = {e: s.ppl for e, s in report.perplexity.items()}
            summary.members.append(lang)
        write_report(tmp, summary)

    try:
        path = write_atomically(out, overwrite, fill)
    finally:
        sw.restore_dense()  # hand the model back dense
    result = summary.to_dict() | {"out": str(path)}
    if compare:
        result["compare"] = _compare(path, list(calib))
    return result


def _compare(path: Path, langs: list[str]) -> str | None:
    """``codeprune compare`` over the members, into ``path/compare``; None (and a warning) on failure."""
    try:
        return compare_runs([path / lang for lang in langs], out=path / "compare")["out"]
    except Exception as e:  # the sweep itself is saved: say so rather than lose it
        print(f"codeprune: warning: the sweep is saved in {path}, but comparing its runs failed "
              f"({type(e).__name__}: {e}); run `codeprune compare {path}`", file=sys.stderr)
        return None
