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
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import calibration_windows, heldout_windows, read_source
from .data.calibration import check_window_sizes
from .engine import place_model, resolve_device
from .errors import ConfigError, CorpusError
from .evaluate import perplexity, protocol
from .evaluate.efficiency import energy_tracker
from .evaluate.humaneval import HumanEvalConfig, run_humaneval, write_samples
from .evaluate.perplexity import perplexity_remapped
from .export import check_output, save_checkpoint
from .methods import make_pruner
from .methods.base import prune_model_
from .methods.structured import check_offload, prune_structured_
from .models.sources import LoadedModel, load_model
from .report import count_parameters, decoder_sparsity, linear_sparsity, render_markdown
from .structure import decoder_param_count


def load(model: str, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a model: offline alias, .gguf file, local folder or hub id (see ``codeprune models``)."""
    return load_model(model, dtype=dtype)


def _as_loaded(model: str | LoadedModel, dtype, seq_len: int) -> LoadedModel:
    lm = model if isinstance(model, LoadedModel) else load(model, dtype=dtype)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
    return lm


@dataclass
class PruneResult:
    model: LoadedModel  # pruned in place
    report: dict
    out: Path | None  # the checkpoint folder, when ``out`` was given


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_method(method: str, sparsity, pattern, ratio, options: dict):
    """The pruner for ``method``: unstructured methods take sparsity/pattern, structured ones ratio."""
    from .methods import is_structured

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
    holds the pruned model's efficiency figures (evaluate/efficiency.py), the
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
        from .evaluate.efficiency import efficiency_report

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
    from .recipe import (
        Recipe,
        RecipeState,
        check_budget,
        check_stage,
        check_target,
        load_recipe,
        run_recipe,
    )
    from .structure import needs_modeling_file

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
    from .evaluate.efficiency import measure_speed

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
    from .structure import needs_modeling_file

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


def _ppl_sources(ppl) -> list[tuple[str, str | None]]:
    """[(source spec, language or None)], with ``code-ppl`` expanded to the corpora present."""
    from .data.sources import LANGUAGES, code_corpora

    out: list[tuple[str, str | None]] = []
    for spec in ppl:
        if spec == "code-ppl":
            out += [(s, lang) for lang, s in code_corpora().items()]
        else:
            head = spec.split(":", 1)[0]
            lang = head if head in LANGUAGES and ":" in spec else None
            out.append((spec, "python" if spec == "python-stdlib" else lang))
    return list(dict.fromkeys(out))


def evaluate(model: str | LoadedModel | None = None, *, ppl: list[str] | tuple[str, ...] | None = None,
             humaneval: bool | HumanEvalConfig = False, efficiency: bool = True, seq_len: int = 512,
             windows: int = 32, device: str = "cpu", text_field: str = "text", offload: bool = False,
             dtype: str | torch.dtype = "float32", out: str | Path | None = None,
             overwrite: bool = False, ppl_tokenizer: str | None = None) -> dict:
    """Evaluate a model: held-out perplexity per source, HumanEval pass@k, efficiency.

    ``ppl``: sources scored on their held-out split (``code-ppl`` = every language
    corpus present); the default is python-stdlib unless HumanEval is asked.
    ``humaneval``: True or a ``HumanEvalConfig``; with ``completions`` set in it,
    completions produced elsewhere are scored and no model is loaded. With
    ``efficiency`` (default) and a model: size, disk, MACs per token, prefill/decode
    tokens/s at batch 1 and 8, peak memory, energy estimate. With ``offload`` the model stays on the
    CPU and one layer at a time runs on ``device``. With ``out``: report.json,
    report.md (and humaneval_samples.jsonl) written there atomically.
    ``ppl_tokenizer`` (a model name: the original of a vocabulary-pruned model) cuts the
    held-out windows with that model's tokenizer and scores them per *its* tokens
    (evaluate.perplexity.perplexity_remapped), so the figure compares with the original's.
    Returns {"model", "perplexity": {spec: {...}}, "humaneval": {...}, "efficiency": {...}, ...}."""
    he = HumanEvalConfig() if humaneval is True else humaneval or None
    if ppl is None:
        ppl = [] if he else ["python-stdlib"]
    efficiency = efficiency and model is not None
    needs_model = bool(ppl) or efficiency or (he is not None and he.completions is None)
    if needs_model and model is None:
        raise ConfigError("give --model (only --humaneval --completions FILE works without one)")
    if out is not None:
        check_output(out, overwrite)
    dev = resolve_device(device)
    check_window_sizes(windows, seq_len)
    sources = _ppl_sources(ppl)
    corpora = [(read_source(src, text_field=text_field), lang) for src, lang in sources]  # fail fast
    if he is not None and he.completions is None:
        from .evaluate.sandbox import check_sandbox

        check_sandbox(he.limits)  # before minutes of generation
    vllm = he is not None and he.completions is None and he.backend == "vllm"
    if vllm:
        if isinstance(model, LoadedModel):
            raise ConfigError("--backend vllm loads the model itself: give a folder, alias or hub id")
        folder = Path(str(model)).expanduser()
        if (folder / "config.json").is_file():
            from transformers import AutoConfig

            from .structure import needs_modeling_file

            if needs_modeling_file(AutoConfig.from_pretrained(folder)):
                raise ConfigError(f"{model} has per-layer sizes or extra biases (modeling_codeprune.py), "
                                  "which vLLM cannot serve: use --backend hf")
        efficiency = False  # measured on the HF copy, it would not describe vLLM's serving
    result: dict = {"kind": "eval"}
    lm = None
    if needs_model:
        lm = _as_loaded(model, dtype, seq_len)
        if not offload and not vllm:  # offload: perplexity brings one layer at a time to the device
            place_model(lm, dev)
        sparsity = decoder_sparsity(lm)
        total, nonzero = count_parameters(lm.model)
        result.update(model=lm.name, sparsity=sparsity, params_total=total, params_nonzero=nonzero,
                      source=lm.origin)
    else:
        result["model"] = str(model) if model is not None else None
    if corpora:
        remap, window_tok = None, lm.tokenizer
        if ppl_tokenizer is not None:
            from .models.sources import load_tokenizer
            from .vocab import id_map, make_remap

            if offload:
                raise ConfigError("--ppl-tokenizer scores on one device: drop --offload")
            window_tok = load_tokenizer(ppl_tokenizer)
            remap = make_remap(window_tok, lm.tokenizer, id_map(window_tok, lm.tokenizer))

        results = {}
        for corpus, lang in corpora:
            held = heldout_windows(window_tok, corpus, seq_len=seq_len, max_windows=windows)
            if remap is not None:
                scores = perplexity_remapped(lm, held, remap, desc=f"ppl {corpus.spec}")
                note = f"; windows cut by the tokenizer of {ppl_tokenizer}, ppl per its tokens"
            else:
                scores = perplexity(lm, held, desc=f"ppl {corpus.spec}",
                                    offload_device=dev if offload else None)
                note = ""
            results[corpus.spec] = {**scores, "language": lang, "protocol": protocol(held) + note}
        result["perplexity"] = results
    if offload and not vllm and (efficiency or (he is not None and he.completions is None)):
        place_model(lm, dev)  # generation and speed need the whole model on the device
    samples = None
    if he is not None:
        path = lm.origin.get("path") if lm is not None else None
        result["humaneval"], samples = run_humaneval(he, lm, model_path=path or model)
    if efficiency:
        from .evaluate.efficiency import efficiency_report

        path = lm.origin.get("path")
        folder = Path(path) if path and Path(path).is_dir() else None  # a hub id has no folder
        result["efficiency"] = efficiency_report(lm, checkpoint=folder)
    if out is not None:
        result["out"] = str(write_eval_report(out, result, samples, overwrite=overwrite))
    return result


def write_eval_report(out: str | Path, result: dict, samples: list[dict] | None, *,
                      overwrite: bool = False) -> Path:
    """report.json, report.md and the HumanEval samples of one eval run, written atomically."""
    from .export import write_atomically
    from .report import render_eval_markdown

    def fill(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "report.md").write_text(render_eval_markdown(result))
        if samples is not None:
            write_samples(tmp / "humaneval_samples.jsonl", samples)

    return write_atomically(out, overwrite, fill)


def compare(runs: list[str | Path], *, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Mask Jaccard distances (per sublayer type, layer, model) and the calibration x evaluation
    language perplexity matrix of run folders; compare.json/md and heatmaps in ``out``."""
    from .analysis import compare_runs

    return compare_runs(runs, out=out, overwrite=overwrite)


def report(runs: list[str | Path], *, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """One table over many run folders; runs.json, report.md and plots in ``out``."""
    from .analysis import report_runs

    return report_runs(runs, out=out, overwrite=overwrite)


def recover(model: str, data: str, *, out: str | Path, device: str = "auto", dtype: str = "float32",
            eval_ppl: str | None = "python-stdlib", eval_windows: int = 16, ppl_seq_len: int = 512,
            keep_checkpoints: bool = False, overwrite: bool = False, **options):
    """LoRA recovery of a pruned checkpoint on instruction ``data``, merged and saved to ``out``;
    ``options`` are ``RecoverConfig`` fields (lora_r, lora_alpha, lora_dropout, targets, lr,
    epochs, max_steps, batch_size, grad_accum, seq_len, eval_fraction, eval_steps,
    save_steps, seed, keep_mask). Returns a ``RecoverResult`` (report, out). See
    codeprune/recovery.py and docs/recovery.md."""
    from .recovery import RecoverConfig
    from .recovery import recover as _recover

    try:
        config = RecoverConfig(**options)
    except TypeError as e:
        raise ConfigError(f"bad recover option: {e}") from None
    return _recover(model, data, out=out, config=config, device=device, dtype=dtype, eval_ppl=eval_ppl,
                    eval_windows=eval_windows, ppl_seq_len=ppl_seq_len, keep_checkpoints=keep_checkpoints,
                    overwrite=overwrite)


def instructions(source: str, *, out: str | Path | None = None, eval_fraction: float = 0.05,
                 overwrite: bool = False) -> tuple[list[dict], dict]:
    """Instruction pairs (docstring -> body) from a codebase ``python:DIR``; written to ``out``
    (.jsonl) when given. Returns (records, summary). See codeprune/data/instructions.py."""
    from .data.instructions import build_instructions, check_jsonl_output, write_jsonl

    if out is not None:
        check_jsonl_output(out, overwrite)  # before reading the codebase
    records, summary = build_instructions(source, eval_fraction=eval_fraction)
    if out is not None:
        summary["out"] = str(write_jsonl(records, out, overwrite=overwrite))
    return records, summary


def sweep(model: str | LoadedModel, method: str = "wanda", **kwargs) -> dict:
    """Language-specific sub-models: see ``codeprune.language_sweep.sweep``."""
    from .language_sweep import sweep as _sweep

    return _sweep(model, method, **kwargs)


def distill_data(original: str | LoadedModel, pruned: str | LoadedModel, data: str, *,
                 out: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
                 dtype: str | torch.dtype = "float32", **options) -> tuple[list[dict], dict]:
    """Flab-Pruner's code instruction data strategy: keep the examples of ``data`` the pruned
    model gets wrong, with the original model's answer as target where it is correct;
    written to ``out`` (.jsonl) when given. ``options`` are ``distill.DistillConfig``
    fields (criterion, match_threshold, max_new_tokens, batch_size, limit, timeout,
    memory_mb, workers). Returns (records, summary). See codeprune/distill.py."""
    from .data.instructions import check_jsonl_output, write_jsonl
    from .distill import DistillConfig, distill, read_rows

    try:
        cfg = DistillConfig(**options)
    except TypeError as e:
        raise ConfigError(f"bad distill-data option: {e}") from None
    if out is not None:
        check_jsonl_output(out, overwrite)
    rows = read_rows(data, cfg.limit)  # fail fast on bad data, before loading two models
    if any(r.has_tests for r in rows) and cfg.criterion != "match":
        from .evaluate.sandbox import SandboxLimits, check_sandbox

        check_sandbox(SandboxLimits(timeout=cfg.timeout, memory_mb=cfg.memory_mb))
    dev = resolve_device(device)
    models = []
    for m in (original, pruned):
        lm = m if isinstance(m, LoadedModel) else load(m, dtype=dtype)
        place_model(lm, dev)
        models.append(lm)
    records, summary = distill(models[0], models[1], data, cfg)
    summary.update(original=models[0].name, pruned=models[1].name)
    if not records:
        raise CorpusError(f"the pruned model answers all {summary['examples']} examples correctly by "
                          f"criterion '{cfg.criterion}': nothing to distill")
    if out is not None:
        summary["out"] = str(write_jsonl(records, out, overwrite=overwrite))
    return records, summary
