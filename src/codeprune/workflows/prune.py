"""The Python API: ``load``, ``prune``, ``evaluate``, ``sweep``, ``compare``, ``report``,
``recover``, ``instructions``, ``distill_data`` (the CLI calls exactly these).

    import codeprune
    lm = codeprune.load("smollm2-135m")
    result = codeprune.prune(lm, "wanda", sparsity=0.5, calib="python-stdlib",
                             samples=64, seq_len=512, out="runs/wanda50")
    print(result.report["ppl_dense"], result.report["ppl_pruned"])
    codeprune.evaluate("runs/wanda50", ppl=["code-ppl"], humaneval=True, out="runs/wanda50-eval")
    codeprune.sweep("smollm2-135m", "wanda", calib_langs="python,java", out="runs/langs")
    codeprune.compare(["runs/langs/python", "runs/langs/java"], out="runs/langs/compare")
    codeprune.report(["runs/wanda50", "runs/langs/python"], out="runs/report")
    codeprune.instructions("python:src/", out="data/instr.jsonl")
    codeprune.recover("runs/wanda50", "data/instr.jsonl", out="runs/wanda50-rec", epochs=1)
    codeprune.prune("qwen2.5-coder-0.5b", recipe="flab", target=0.22, out="runs/q-flab-22")
    codeprune.distill_data("qwen2.5-coder-0.5b", "runs/q-flab-22", "data/instr.jsonl",
                           out="data/instr-flab.jsonl")
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import calibration_windows, heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.errors import ConfigError
from codeprune.evaluation.efficiency import energy_tracker
from codeprune.evaluation.perplexity import perplexity, perplexity_remapped, protocol
from codeprune.methods import make_pruner
from codeprune.methods.structured.plan import decoder_param_count
from codeprune.methods.structured.prune import check_offload, prune_structured_
from codeprune.methods.unstructured.base import prune_model_
from codeprune.models.checkpoint import save_checkpoint
from codeprune.models.counting import count_parameters, linear_sparsity
from codeprune.models.loading import LoadedModel
from codeprune.outputs import check_output
from codeprune.reporting.markdown import render_markdown
from codeprune.workflows.common import _as_loaded, peak_rss_mb


@dataclass
class PruneResult:
    model: LoadedModel  # pruned in place
    report: dict
    out: Path | None  # the checkpoint folder, when ``out`` was given


def _make_method(method: str, sparsity, pattern, ratio, options: dict):
    """The pruner for ``method``: unstructured methods take sparsity/pattern, structured ones ratio."""
    from codeprune.methods import is_structured

    options = {k: v for k, v in options.items() if v is not None}
    if is_structured(method):
        if sparsity is not None or pattern != "unstructured":
            raise ConfigError(f"'{method}' removes heads and channels: give --ratio (the fraction of "
                              "decoder-layer parameters removed), not --sparsity / --pattern")
        return make_pruner(method, ratio=0.2 if ratio is None else ratio, **options)
    if ratio is not None:
        raise ConfigError(f"--ratio is for the structured methods; '{method}' takes --sparsity")
    return make_pruner(method, sparsity=0.5 if sparsity is None else sparsity, pattern=pattern, **options)


def prune(model: str | LoadedModel, method: str | None = None, *, sparsity: float | None = None,
          pattern: str = "unstructured", ratio: float | None = None, recipe=None,
          target: float | None = None, min_count: int | None = None, calib: str = "python-stdlib",
          samples: int = 64, seq_len: int = 512, seed: int = 0, text_field: str = "text", device: str = "cpu",
          offload: bool = False, batch_size: int = 8, out: str | Path | None = None,
          overwrite: bool = False, eval_ppl: bool = True, eval_windows: int = 32,
          efficiency: bool = True, dtype: str | torch.dtype = "float32", **method_options) -> PruneResult:
    """Prune ``model`` in place with ``method`` and return the pruned model and its report.

    Unstructured / N:M methods (magnitude, wanda, sparsegpt): ``sparsity`` (default
    0.5) applies per Linear of every decoder layer (embeddings and lm_head are
    kept); ``pattern`` is "unstructured" or "N:M". Structured methods (flap,
    wanda-sp, magnitude-sp, taylor): ``ratio`` (default 0.2) is the fraction of
    decoder-layer parameters removed, by cutting attention heads and FFN channels;
    ``structure`` ("uniform" / "adaptive"), ``compensation``, ``metric`` (flap),
    ``head_unit``, ``attn_square``, ``scope`` (layers pruned, as fractions of depth),
    ``units`` ("all", "ffn": FFN channels only, "heads": attention heads only)
    and, for taylor, ``importance``, ``aggregation`` and ``checkpointing`` go to the
    method (methods/structured.py, methods/taylor.py).
    Calibration uses ``samples`` windows of ``seq_len`` tokens from the calibration
    split of ``calib``; with ``eval_ppl`` the dense and pruned models are scored on
    ``eval_windows`` windows of its held-out split. With ``efficiency`` the report
    holds the pruned model's efficiency figures (evaluation/efficiency.py), the
    energy estimate of the pruning step and, for structured methods, the dense
    model's batch-1 speed. With ``out`` the result is saved as an HF checkpoint
    (plain, or with modeling_codeprune.py for per-layer sizes) plus report.json / report.md.

    Recipes: ``recipe`` (a built-in name such as "flab", a YAML path, or a
    ``recipe.Recipe``) runs its stages in order instead of one method, removing
    ``target`` (a fraction of *all* parameters; default the recipe's own) split
    across the stages as codeprune/recipe.py documents; ``min_count`` overrides its
    vocab stage's; the report lists every stage."""
    if min_count is not None and recipe is None:
        raise ConfigError("--min-count is an option of a recipe's vocab stage: give --recipe")
    if recipe is not None:
        if method is not None or sparsity is not None or ratio is not None or pattern != "unstructured":
            raise ConfigError("a recipe brings its own methods: drop --method / --sparsity / --pattern / "
                              "--ratio")
        if any(v is not None for v in method_options.values()):
            raise ConfigError("method options go into the recipe's stages, not the command line")
        return _prune_recipe(model, recipe, target=target, calib=calib, samples=samples, seq_len=seq_len,
                             seed=seed, text_field=text_field, device=device, offload=offload,
                             batch_size=batch_size, out=out, overwrite=overwrite, eval_ppl=eval_ppl,
                             eval_windows=eval_windows, efficiency=efficiency, dtype=dtype,
                             min_count=min_count)
    if target is not None:
        raise ConfigError("--target goes with --recipe; a single method takes --sparsity or --ratio")
    pruner = _make_method(method or "wanda", sparsity, pattern, ratio, method_options)
    structured = getattr(pruner, "structured", False)
    if structured:
        check_offload(pruner, offload)  # before minutes of loading and evaluation
    if out is not None:
        check_output(out, overwrite)  # refuse before spending minutes on the model
    dev = resolve_device(device)
    lm, corpus, calib_set, held = _prepare(model, calib, samples, seq_len, seed, text_field, dtype,
                                   eval_windows if eval_ppl else None)

    def score(tag: str) -> float | None:
        if held is None:
            return None
        if offload:
            return perplexity(lm, held, desc=f"ppl {tag}", offload_device=dev)["ppl"]
        place_model(lm, dev)
        return perplexity(lm, held, desc=f"ppl {tag}")["ppl"]

    ppl_dense = score("dense")
    params_dense = count_parameters(lm.model)[0]
    dense_speed = None
    if structured:
        decoder_dense = decoder_param_count(lm.adapter)
        if efficiency:
            dense_speed = _batch1_speed(lm, dev, offload)
    uses_data = getattr(pruner, "uses_calibration", pruner.needs_calibration)
    start = time.perf_counter()
    with energy_tracker() as energy:
        ids = calib_set.input_ids if uses_data else None
        if structured:
            plan = prune_structured_(lm, pruner, ids, device=dev, offload=offload, batch_size=batch_size)
        else:
            pruned = prune_model_(lm, pruner, ids, device=dev, offload=offload, batch_size=batch_size)
    seconds = time.perf_counter() - start
    ppl_pruned = score("pruned")

    report = _common_report(lm, pruner, calib_set if uses_data else None, held, ppl_dense, ppl_pruned,
                            seconds, dev, text_field)
    if structured:
        report.update(_structured_fields(lm, pruner, plan, decoder_dense, params_dense))
    else:
        report.update(_sparse_fields(lm, pruner, pruned))
    report["params_dense"] = params_dense
    report["energy_prune"] = energy or None
    if efficiency and offload:
        place_model(lm, dev)
    return _finish(lm, report, efficiency, dense_speed, out, overwrite)


def _finish(lm, report: dict, efficiency: bool, dense_speed: dict | None, out,
            overwrite: bool) -> PruneResult:
    """Efficiency figures (and the batch-1 speed-up when ``dense_speed`` is known), then the
    checkpoint with report.json / report.md."""
    if efficiency:
        from codeprune.evaluation.efficiency import efficiency_report

        report["efficiency"] = efficiency_report(lm)  # disk_bytes filled in when saved
        if dense_speed is not None:
            report["tokens_per_s_dense"] = dense_speed
            report["tokens_per_s_pruned"] = _speed_fields(report["efficiency"]["speed"]["batch_1"])
    path = None
    if out is not None:
        path = save_checkpoint(lm, out, overwrite=overwrite, report=report, render=render_markdown)
    return PruneResult(lm, report, path)


def _prune_recipe(model, recipe, *, target, calib, samples, seq_len, seed, text_field, device, offload,
                  batch_size, out, overwrite, eval_ppl, eval_windows, efficiency, dtype,
                  min_count=None) -> PruneResult:
    """``prune`` with a recipe: stages in order to ``target`` of all parameters (recipe.py);
    ``min_count`` overrides the vocab stage's."""
    from codeprune.models.checkpoint import needs_modeling_file
    from codeprune.recipes.runner import RecipeState, run_recipe
    from codeprune.recipes.spec import Recipe, check_budget, check_stage, check_target, load_recipe

    rec = copy.deepcopy(recipe) if isinstance(recipe, Recipe) else load_recipe(recipe)
    if min_count is not None:
        vocab = [s for s in rec.stages if s.kind == "vocab"]
        if not vocab:
            raise ConfigError(f"--min-count: recipe '{rec.name}' has no vocab stage")
        vocab[0].options["min_count"] = min_count
        check_stage(vocab[0], "--min-count")
    target = check_target(target) if target is not None else rec.target
    check_budget(rec, target)  # before minutes of loading
    if offload:
        raise ConfigError("recipes run the whole model on one device (the layer search compares full "
                          "forward passes): drop --offload")
    if out is not None:
        check_output(out, overwrite)
    dev = resolve_device(device)
    lm, corpus, calib_set, held = _prepare(model, calib, samples, seq_len, seed, text_field, dtype,
                                   eval_windows if eval_ppl else None)
    place_model(lm, dev)

    def score(m, remap, tag="pruned"):
        if held is None:
            return None
        if remap is None:
            return perplexity(m, held, desc=f"ppl {tag}")["ppl"]
        return perplexity_remapped(m, held, remap, desc=f"ppl {tag}")["ppl"]

    ppl_dense = score(lm, None, "dense")
    params_dense = count_parameters(lm.model)[0]
    shape_dense = _model_shape(lm)
    dense_speed = _batch1_speed(lm, dev, False) if efficiency else None
    state = RecipeState(calib_set.input_ids, corpus, text_field, dev, batch_size)
    start = time.perf_counter()
    with energy_tracker() as energy:
        stages = run_recipe(lm, rec, target=target, state=state, score=score if held is not None else None)
    seconds = time.perf_counter() - start
    total, nonzero = count_parameters(lm.model)
    actual = 1 - total / params_dense
    notes = [lm.origin["note"]] if lm.origin.get("note") else []
    if target is not None and abs(actual - target) > 0.01:
        notes.append(f"target {target:.1%} missed by {abs(actual - target):.1%}: the last budgeted stage "
                     "removes coarse units (whole layers), or a stage removed more than its budget")
    report = {
        "model": lm.name, "method": f"recipe:{rec.name}", "pruning": "recipe", "recipe": rec.describe(),
        "target": target, "ratio_actual_total": actual,
        "target_error": None if target is None else actual - target,
        "params_dense": params_dense, "params_total": total, "params_nonzero": nonzero,
        "stages": stages, "dense_shape": shape_dense, **_model_shape(lm),
        "calibration": {**calib_set.describe(), "text_field": text_field},
        "ppl_dense": ppl_dense, "ppl_pruned": stages[-1].get("ppl") if held is not None else None,
        "ppl_protocol": (protocol(held) + ("; after a vocab stage, per original token (the same text, "
                                           "re-tokenized by the pruned tokenizer)" if state.remap else ""))
        if held is not None else None,
        "seconds_prune": seconds, "peak_rss_mb": peak_rss_mb(), "device": str(dev), "source": lm.origin,
        "export": "trust_remote_code" if needs_modeling_file(lm.model.config) else "plain",
        "energy_prune": energy or None, "notes": notes,
        "structure_notes": [n for st in stages for n in st.get("notes", [])],
    }
    return _finish(lm, report, efficiency, dense_speed, out, overwrite)


def _model_shape(lm) -> dict:
    """Vocabulary, depth and per-layer sizes of ``lm`` now."""
    a = lm.adapter
    sizes = [a.layer_sizes(layer) for layer in a.layers()]
    return {"vocab_size": a.embed_tokens().num_embeddings, "num_layers": a.num_layers,
            "heads_per_layer": [s["heads"] for s in sizes],
            "kv_heads_per_layer": [s["kv_heads"] for s in sizes],
            "ffn_per_layer": [s["intermediate"] for s in sizes]}


def _prepare(model, calib: str, samples: int, seq_len: int, seed: int, text_field: str, dtype,
             eval_windows: int | None) -> tuple[LoadedModel, object, object, object]:
    """(model, corpus, calibration windows, held-out windows or None), sizes checked before any
    loading."""
    if eval_windows is not None and eval_windows < 1:
        raise ConfigError(f"eval_windows must be >= 1, got {eval_windows}")
    check_window_sizes(samples, seq_len)
    corpus = read_source(calib, text_field=text_field)
    lm = _as_loaded(model, dtype, seq_len)
    calib_set = calibration_windows(lm.tokenizer, corpus, samples=samples, seq_len=seq_len, seed=seed)
    held = None
    if eval_windows is not None:
        held = heldout_windows(lm.tokenizer, corpus, seq_len=seq_len, max_windows=eval_windows)
    return lm, corpus, calib_set, held


def _speed_fields(speed: dict) -> dict:
    return {"prefill": speed["prefill_tok_s"], "decode": speed["decode_tok_s"],
            "prompt_len": speed["prompt_len"], "new_tokens": speed["new_tokens"], "batch": 1}


def _batch1_speed(lm: LoadedModel, dev, offload: bool) -> dict:
    """Prefill/decode tokens/s at batch 1 (the same measurement the pruned model gets)."""
    from codeprune.evaluation.efficiency import measure_speed

    place_model(lm, dev)
    speed = _speed_fields(measure_speed(lm, batch_size=1))
    if offload:
        place_model(lm, "cpu")
    return speed


def _common_report(lm, pruner, calib_set, held, ppl_dense, ppl_pruned, seconds, dev, text_field) -> dict:
    """The fields of report.json every pruning run has (see the README for the fields)."""
    total, nonzero = count_parameters(lm.model)
    return {
        "model": lm.name,
        "method": pruner.name,
        "params_total": total,
        "params_nonzero": nonzero,
        "calibration": {**calib_set.describe(), "text_field": text_field} if calib_set is not None else None,
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "ppl_protocol": protocol(held) if held is not None else None,
        "seconds_prune": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(dev),
        "method_options": dict(vars(pruner.config)),
        "source": lm.origin,
        "notes": [lm.origin["note"]] if lm.origin.get("note") else [],
    }


def _sparse_fields(lm, pruner, pruned) -> dict:
    actual, per_layer = linear_sparsity(lm.model, pruned)
    return {"pruning": "unstructured", "pattern": pruner.config.pattern,
            "sparsity_target": pruner.config.sparsity,
            "sparsity_actual": actual, "per_layer": per_layer}


def _structured_fields(lm, pruner, plan, decoder_dense: int, params_dense: int) -> dict:
    from codeprune.models.checkpoint import needs_modeling_file

    decoder = decoder_param_count(lm.adapter)
    total = count_parameters(lm.model)[0]
    planned = plan.planned_params
    if planned != {"total": total, "decoder": decoder}:  # the plan's count is a contract: tested
        raise RuntimeError(f"plan predicted {planned} parameters, surgery gave total {total}, "
                           f"decoder {decoder}")
    remote = needs_modeling_file(lm.model.config)
    notes = list(plan.notes)
    if getattr(lm.model.config, "codeprune_extra_bias", None):
        notes.append(f"{lm.model.config.model_type} has no config flag for the compensation biases "
                     f"({', '.join(lm.model.config.codeprune_extra_bias)}): load with trust_remote_code=True "
                     "or codeprune.load (plain from_pretrained drops them)")
    fields = {}
    grads = getattr(pruner, "gradients", None)
    if grads is not None:
        fields["gradient_pass"] = {"samples": grads.samples, "seconds": grads.seconds, "loss": grads.loss,
                                   "peak_cuda_mb": grads.peak_memory_mb,
                                   "checkpointing": pruner.config.checkpointing}
    return fields | {
        "pruning": "structured",
        "structure": pruner.config.structure,
        "compensation": pruner.config.compensation,
        "ratio_target": pruner.config.ratio,
        "ratio_actual_decoder": 1 - decoder / decoder_dense,
        "ratio_actual_total": 1 - total / params_dense,
        "params_decoder_dense": decoder_dense,
        "params_decoder": decoder,
        "heads_per_layer": plan.heads_per_layer,
        "kv_heads_per_layer": plan.kv_heads_per_layer,
        "ffn_per_layer": plan.ffn_per_layer,
        "export": "trust_remote_code" if remote else "plain",
        "structure_notes": notes,
    }
