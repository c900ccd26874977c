"""``codeprune prune``: one method or a recipe, from a model name to a checkpoint and a report.

    codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50
    codeprune prune --model qwen2.5-coder-0.5b --recipe flab --target 0.22 --out runs/q-flab-22

There is one path: a single method is a one-stage recipe. ``prune`` validates
everything it can before loading (options, recipe, output folder, device
placement), loads the model and the calibration / held-out windows, measures the
dense model, runs the recipe's stages (recipes/runner.py, each method through
``methods.run_method``), measures the pruned model, and saves the checkpoint with
report.json / report.md.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import calibration_windows, heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.errors import CodepruneError, ConfigError
from codeprune.evaluation.efficiency import efficiency_report, energy_tracker, measure_speed
from codeprune.evaluation.perplexity import perplexity, perplexity_remapped, protocol
from codeprune.methods import METHODS, is_structured, option_default
from codeprune.models.checkpoint import needs_modeling_file, save_checkpoint
from codeprune.models.counting import count_parameters
from codeprune.models.dtypes import parse_dtype
from codeprune.models.gguf_export import check_options
from codeprune.models.loading import LoadedModel
from codeprune.recipes.runner import RecipeState, check_reach, run_recipe
from codeprune.recipes.spec import (
    Recipe,
    Stage,
    check_budget,
    check_offload,
    check_stage,
    check_target,
    load_recipe,
    stage_uses_data,
)
from codeprune.reporting.model_card import render_model_card
from codeprune.reporting.provenance import display_name
from codeprune.reporting.schema import PruneReport
from codeprune.reporting.writer import writes_report
from codeprune.workflows.common import as_loaded, check_out, prune_header, releasing_outputs, weights_bytes
from codeprune.workflows.export import check_gguf_outputs, export_loaded, preflight

# the fields of a single method's stage record that are the report's own (see the README)
STAGE_BOOKKEEPING = ("stage", "method", "options", "budget_params", "params_before", "params_after",
                     "removed_params", "removed_fraction", "seconds", "ppl", "note")


@dataclass
class PruneResult:
    model: LoadedModel  # pruned in place
    report: dict
    out: Path | None  # the checkpoint folder, when ``out`` was given
    export: dict | None = None  # the GGUF export (``gguf``): workflows/export.py ExportResult.to_dict()


@releasing_outputs
def prune(model: str | LoadedModel, method: str | None = None, *, sparsity: float | None = None,
          pattern: str = "unstructured", ratio: float | None = None, recipe=None,
          target: float | None = None, min_count: int | None = None, calib: str = "python-stdlib",
          samples: int = 64, seq_len: int = 512, seed: int = 0, text_field: str = "text", device: str = "cpu",
          offload: bool = False, batch_size: int = 8, out: str | Path | None = None,
          overwrite: bool = False, eval_ppl: bool = True, eval_windows: int = 32,
          efficiency: bool = True, dtype: str | torch.dtype = "float32", save_dtype: str | None = None,
          gguf: str | None = None, **method_options) -> PruneResult:
    """Prune ``model`` in place with ``method`` (or ``recipe``) and return the pruned model and its report.

    Unstructured / N:M methods (magnitude, wanda, sparsegpt): ``sparsity`` (default
    0.5) applies per Linear of every decoder layer (embeddings and lm_head are
    kept); ``pattern`` is "unstructured" or "N:M". Structured methods (flap,
    wanda-sp, magnitude-sp, taylor): ``ratio`` (default 0.2) is the fraction of
    decoder-layer parameters removed, by cutting attention heads and FFN channels.
    ``method_options`` are the method's config fields (methods/*/: ``structure``,
    ``compensation``, ``metric``, ``head_unit``, ``attn_square``, ``scope``, ``units``,
    ``importance``, ``aggregation``, ``checkpointing``, ``block_size``, ``damp``, ...;
    None means the method's default).
    Calibration uses ``samples`` windows of ``seq_len`` tokens from the calibration
    split of ``calib``; with ``eval_ppl`` the dense and pruned models are scored on
    ``eval_windows`` windows of its held-out split. With ``efficiency`` the report
    holds the pruned model's efficiency figures (evaluation/efficiency.py), the
    energy estimate of the pruning step and, when shapes change, the dense model's
    batch-1 speed. With ``out`` the result is saved as an HF checkpoint (plain, or
    with modeling_codeprune.py for per-layer sizes) in ``save_dtype`` (float32, bfloat16,
    float16; default the source's dtype, bfloat16 for dequantized GGUF) with report.json /
    report.md and a model card (README.md). With ``gguf`` (a type: f16, q8_0, ...; needs ``out``)
    the result is also exported for llama.cpp / ollama to ``OUT.TYPE.gguf`` with
    ``OUT.TYPE.Modelfile`` beside it (workflows/export.py).

    Recipes: ``recipe`` (a built-in name such as "flab", a YAML path, or a
    ``recipes.spec.Recipe``) runs its stages in order, removing ``target`` (a
    fraction of *all* parameters; default the recipe's own) split across the
    stages as docs/recipes.md documents; ``min_count`` overrides its vocab stage's;
    the report lists every stage."""
    rec, target, single = _as_recipe(method, sparsity, pattern, ratio, recipe, target, min_count,
                                     method_options)
    check_offload(rec, offload)  # before minutes of loading and evaluation
    if save_dtype is not None:
        parse_dtype(save_dtype)
    expected = _expected_bytes(model, rec, target, single, save_dtype)
    check_out(out, overwrite, model, calib, expected_bytes=expected)  # before loading anything
    gguf_out = _check_gguf(gguf, out, overwrite, model, calib)
    dev = resolve_device(device)
    lm, corpus, calib_set, held = _prepare(model, calib, samples, seq_len, seed, text_field, dtype,
                                           eval_windows if eval_ppl else None, reach=(rec, target))
    if gguf_out is not None:
        preflight(lm, gguf)  # what the dense model already tells: architecture, rope, tokenizer
    if not offload:
        place_model(lm, dev)

    def score(m, remap=None, tag="pruned") -> float | None:
        if held is None:
            return None
        if remap is not None:
            return perplexity_remapped(m, held, remap, desc=f"ppl {tag}")["ppl"]
        return perplexity(m, held, desc=f"ppl {tag}", offload_device=dev if offload else None)["ppl"]

    speed = efficiency and _changes_shapes(rec)
    dense = {"ppl": score(lm, tag="dense"), "params": count_parameters(lm.model)[0],
             "shape": _model_shape(lm), "speed": _batch1_speed(lm, dev, offload) if speed else None}
    state = RecipeState(calib_set.input_ids, corpus, text_field, dev, batch_size, offload=offload)
    start = time.perf_counter()
    with energy_tracker() as energy:
        stages = run_recipe(lm, rec, target=target, state=state, score=None if single else score)
    seconds = time.perf_counter() - start
    ppl_pruned = score(lm, state.remap) if single else stages[-1].get("ppl")
    report = _report(lm, rec, target, single, stages, dense, state, held, calib_set, ppl_pruned,
                     seconds=seconds, device=dev, text_field=text_field, energy=energy)
    if efficiency and offload:
        place_model(lm, dev)  # speed and memory need the whole model on the device
    result = _finish(lm, report, efficiency, dense["speed"], out, overwrite, save_dtype)
    if gguf_out is not None:
        try:
            result.export = export_loaded(lm, gguf_out, gguf_type=gguf, overwrite=overwrite,
                                          base=model if isinstance(model, str) else lm.name).to_dict()
        except CodepruneError as e:
            raise type(e)(f"the checkpoint is saved in {result.out}, but no GGUF was written: {e}") from e
    return result


def _check_gguf(gguf: str | None, out, overwrite: bool, *reads) -> Path | None:
    """``OUT.TYPE.gguf`` for ``prune --gguf TYPE``, its type and outputs checked before any work."""
    if gguf is None:
        return None
    if out is None:
        raise ConfigError("--gguf exports the saved result: give --out too")
    check_options(gguf)
    path = Path(f"{Path(out)}.{gguf}.gguf")
    check_gguf_outputs(path, overwrite, *reads)
    return path


def _as_recipe(method, sparsity, pattern, ratio, recipe, target, min_count,
               method_options: dict) -> tuple[Recipe, float | None, bool]:
    """(recipe, target, single): ``method`` and its options as a one-stage recipe, or ``recipe``
    with ``min_count`` applied; every option checked before any loading."""
    if min_count is not None and recipe is None:
        raise ConfigError("--min-count is an option of a recipe's vocab stage: give --recipe")
    if recipe is None:
        if target is not None:
            raise ConfigError("--target goes with --recipe; a single method takes --sparsity or --ratio")
        stage = _method_stage(method or "wanda", sparsity, pattern, ratio, method_options)
        return Recipe(stage.kind, [stage], source="--method"), None, True
    if method is not None or sparsity is not None or ratio is not None or pattern != "unstructured":
        raise ConfigError("a recipe brings its own methods: drop --method / --sparsity / --pattern / --ratio")
    if any(v is not None for v in method_options.values()):
        raise ConfigError("method options go into the recipe's stages, not the command line")
    rec = copy.deepcopy(recipe) if isinstance(recipe, Recipe) else load_recipe(recipe)
    if min_count is not None:
        vocab = [s for s in rec.stages if s.kind == "vocab"]
        if not vocab:
            raise ConfigError(f"--min-count: recipe '{rec.name}' has no vocab stage")
        vocab[0].options["min_count"] = min_count
        check_stage(vocab[0], "--min-count")
    target = check_target(target) if target is not None else rec.target
    check_budget(rec, target)
    return rec, target, False


def _method_stage(method: str, sparsity, pattern, ratio, options: dict) -> Stage:
    """The one stage of ``--method``: unstructured methods take sparsity/pattern, structured ones ratio."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(sorted(METHODS))}")
    options = {k: v for k, v in options.items() if v is not None}
    if is_structured(method):
        if sparsity is not None or pattern != "unstructured":
            raise ConfigError(f"'{method}' removes heads and channels: give --ratio (the fraction of "
                              "decoder-layer parameters removed), not --sparsity / --pattern")
        options["ratio"] = option_default(method, "ratio") if ratio is None else ratio
    else:
        if ratio is not None:
            raise ConfigError(f"--ratio is for the structured methods; '{method}' takes --sparsity")
        options.update(sparsity=option_default(method, "sparsity") if sparsity is None else sparsity,
                       pattern=pattern)
    stage = Stage(method, options)
    check_stage(stage, f"method '{method}'")
    return stage


def _expected_bytes(model, rec: Recipe, target, single: bool, save_dtype) -> float | None:
    """About the checkpoint's size, known before loading: the source's weights (in the save
    dtype) less the share the recipe or method removes (a lower bound: the exact size is
    checked again before writing)."""
    size = weights_bytes(model, save_dtype)
    if size is None:
        return None
    removed = target if target is not None else rec.stages[0].options.get("ratio", 0.0) if single else 0.0
    return size * (1.0 - removed)


def _changes_shapes(recipe: Recipe) -> bool:
    """Whether some stage removes parameters (the dense batch-1 speed is then worth measuring)."""
    return any(s.kind in ("vocab", "layers") or is_structured(s.method) for s in recipe.stages)


def _prepare(model, calib: str, samples: int, seq_len: int, seed: int, text_field: str, dtype,
             eval_windows: int | None, reach: tuple = ()) -> tuple[LoadedModel, object, object, object]:
    """(model, corpus, calibration windows, held-out windows or None), sizes checked before any
    loading."""
    if eval_windows is not None and eval_windows < 1:
        raise ConfigError(f"eval_windows must be >= 1, got {eval_windows}")
    check_window_sizes(samples, seq_len)
    corpus = read_source(calib, text_field=text_field)
    lm = as_loaded(model, dtype, seq_len)
    if reach:  # a target the stages cannot remove: refused before calibration (recipes/runner.py)
        check_reach(lm, *reach)
    calib_set = calibration_windows(lm.tokenizer, corpus, samples=samples, seq_len=seq_len, seed=seed)
    held = None
    if eval_windows is not None:
        held = heldout_windows(lm.tokenizer, corpus, seq_len=seq_len, max_windows=eval_windows)
    return lm, corpus, calib_set, held


def _report(lm, rec: Recipe, target, single: bool, stages: list[dict], dense: dict, state: RecipeState,
            held, calib_set, ppl_pruned, *, seconds: float, device, text_field: str, energy) -> dict:
    """report.json of a prune run: the fields every run has, then the method's own (a single
    method's stage record, lifted to the top) or the recipe's (target, stages, shapes)."""
    total, nonzero = count_parameters(lm.model)
    uses_data = any(stage_uses_data(s) for s in rec.stages)
    ppl_protocol = None
    if held is not None:
        ppl_protocol = protocol(held, display_name(held.source))
        if state.remap:
            ppl_protocol += ("; after a vocab stage, per original token (the same text, re-tokenized by the "
                             "pruned tokenizer)")
    report = prune_header(lm, params_dense=dense["params"], calibration=calib_set if uses_data else None,
                          seconds=stages[0]["seconds"] if single else seconds,  # a method: its own time
                          device=device)
    report["calibration"] = report["calibration"] and {**report["calibration"], "text_field": text_field}
    report |= {"method": rec.name if single else f"recipe:{rec.name}",
               "ratio_actual_total": 1 - report["params_total"] / dense["params"],
               "ppl_dense": dense["ppl"], "ppl_pruned": ppl_pruned, "ppl_protocol": ppl_protocol,
               "export": "trust_remote_code" if needs_modeling_file(lm.model.config) else "plain",
               "energy_prune": energy or None}
    notes = [n for st in stages for n in st.get("structure_notes", [])]
    if getattr(lm.model.config, "codeprune_extra_bias", None):
        notes.append(f"{lm.model.config.model_type} has no config flag for the compensation biases "
                     f"({', '.join(lm.model.config.codeprune_extra_bias)}): load with trust_remote_code=True "
                     "or codeprune.load (plain from_pretrained drops them)")
    if single:
        fields = {k: v for k, v in stages[0].items() if k not in STAGE_BOOKKEEPING}
        if fields.get("pruning") == "unstructured":
            del report["ratio_actual_total"]  # zeros are not removed parameters
        return report | fields | ({"structure_notes": notes} if notes else {})
    actual = report["ratio_actual_total"]
    if target is not None and abs(actual - target) > 0.01:
        report["notes"].append(f"target {target:.1%} missed by {abs(actual - target):.1%}: the last budgeted "
                               "stage removes coarse units (whole layers), or a stage removed more than its "
                               "budget")
    records = [{k: v for k, v in st.items() if k != "per_layer"} for st in stages]  # per Linear: too long
    return report | {"pruning": "recipe", "recipe": _no_paths(rec.describe()), "target": target,
                     "target_error": None if target is None else actual - target,
                     "stages": _no_paths(records), "dense_shape": dense["shape"], **_model_shape(lm),
                     "structure_notes": notes}


def _no_paths(value):
    """``value`` (records of a recipe: its source, stage options, corpora) with every local absolute
    path shown as reports show it (``reporting.provenance.display_name``)."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_no_paths(v) for v in value)
    return display_name(value) if isinstance(value, str) else value


def _model_shape(lm) -> dict:
    """Vocabulary, depth and per-layer sizes of ``lm`` now."""
    a = lm.adapter
    sizes = [a.layer_sizes(layer) for layer in a.layers()]
    return {"vocab_size": a.embed_tokens().num_embeddings, "num_layers": a.num_layers,
            "heads_per_layer": [s["heads"] for s in sizes],
            "kv_heads_per_layer": [s["kv_heads"] for s in sizes],
            "ffn_per_layer": [s["intermediate"] for s in sizes]}


def _speed_fields(speed: dict) -> dict:
    return {"prefill": speed["prefill_tok_s"], "decode": speed["decode_tok_s"],
            "prompt_len": speed["prompt_len"], "new_tokens": speed["new_tokens"], "batch": 1}


def _batch1_speed(lm: LoadedModel, dev, offload: bool) -> dict:
    """Prefill/decode tokens/s at batch 1 (the same measurement the pruned model gets)."""
    place_model(lm, dev)
    speed = _speed_fields(measure_speed(lm, batch_size=1))
    if offload:
        place_model(lm, "cpu")
    return speed


def _finish(lm, report: dict, efficiency: bool, dense_speed: dict | None, out, overwrite: bool,
            save_dtype: str | None) -> PruneResult:
    """Efficiency figures (and the batch-1 speed-up when ``dense_speed`` is known), then the
    checkpoint with report.json / report.md."""
    if efficiency:
        report["efficiency"] = efficiency_report(lm)  # disk_bytes filled in when saved
        if dense_speed is not None:
            report["tokens_per_s_dense"] = dense_speed
            report["tokens_per_s_pruned"] = _speed_fields(report["efficiency"]["speed"]["batch_1"])
    record = PruneReport.from_dict(report, "prune report")  # reporting/schema.py
    path = None
    if out is not None:
        path = save_checkpoint(lm, out, overwrite=overwrite, extra=writes_report(record),
                               card=partial(render_model_card, record), save_dtype=save_dtype)
    return PruneResult(lm, record.to_dict(), path)
