"""Running a recipe: its stages in order, each within its share of the target.

    records = run_recipe(lm, load_recipe("flab"), target=0.22, state=RecipeState(...))

``vocab`` and ``layers`` stages call methods/vocab.py and methods/depth.py; every
other stage is a registered method run through ``methods.run_method`` (a single
``codeprune prune --method X`` is a one-stage recipe: workflows/prune.py). Each
stage returns a record (what it removed, its time, what it did); the prune
workflow turns the records into the report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from codeprune.data import read_source
from codeprune.data.calibration import split_documents
from codeprune.data.sources import code_corpora
from codeprune.errors import ConfigError
from codeprune.methods import Produces, is_structured, run_method
from codeprune.methods.depth import choose_layers, remove_layers_
from codeprune.methods.structured.plan import decoder_param_count
from codeprune.methods.vocab import count_tokens, make_remap, prune_vocab_, select_vocab
from codeprune.models.counting import count_parameters, linear_sparsity
from codeprune.recipes.spec import Recipe, Stage, check_budget, stage_method


@dataclass
class RecipeState:
    """What the stages share while a recipe runs."""

    calib_ids: torch.Tensor  # calibration windows for the current tokenizer
    corpus: object  # the calibration source, as read (data.sources.Corpus)
    text_field: str
    device: object
    batch_size: int
    offload: bool = False  # method stages may run layer by layer (the layers stage refuses it)
    remap: object = None  # original-tokenizer ids -> current ids, after a vocab stage


def total_params(lm) -> int:
    return count_parameters(lm.model)[0]


def run_recipe(lm, recipe: Recipe, *, target: float | None, state: RecipeState,
               score=None) -> list[dict]:
    """Run ``recipe``'s stages on ``lm`` in place; returns one record per stage.

    ``score(lm, remap) -> ppl or None`` is called after every stage (per-stage perplexity)."""
    check_budget(recipe, target)
    dense = total_params(lm)
    goal = round(target * dense) if target is not None else 0
    records = []
    for k, stage in enumerate(recipe.stages):
        before = total_params(lm)
        budget = None
        if stage.share is not None:
            weights = sum(recipe.stages[j].share for j in recipe.budgeted if j >= k)
            budget = max(0, round((goal - (dense - before)) * stage.share / weights))
        start = time.perf_counter()
        details = _run_stage(lm, stage, budget, state)
        seconds = time.perf_counter() - start
        after = total_params(lm)
        record = {"stage": stage.kind, "method": stage.method, "options": dict(stage.options),
                  "budget_params": budget, "params_before": before, "params_after": after,
                  "removed_params": before - after, "removed_fraction": (before - after) / dense,
                  "seconds": seconds, **details}
        if score is not None:
            record["ppl"] = score(lm, state.remap)
        records.append(record)
        if len(recipe.stages) > 1:  # a single method's one stage needs no progress line
            tqdm.write(f"stage {k + 1}/{len(recipe.stages)} {stage.kind}: removed {before - after:,} "
                       f"parameters ({(before - after) / dense:.1%} of the dense model) in {seconds:.1f} s",
                       file=sys.stderr)
    return records


def _run_stage(lm, stage: Stage, budget: int | None, state: RecipeState) -> dict:
    if stage.kind == "vocab":
        return _vocab_stage(lm, stage, budget, state)
    if stage.kind == "layers":
        return _layers_stage(lm, stage, budget, state)
    return _method_stage(lm, stage, budget, state)


def _skipped(reason: str) -> dict:
    return {"skipped": reason}


def _corpus_texts(stage: Stage, state: RecipeState):
    """(sources, calibration-split documents) the vocab stage counts on."""
    corpus = stage.options.get("corpus") or state.corpus.spec
    specs = [corpus] if isinstance(corpus, str) else list(corpus)
    if "code" in specs:
        specs = [s for s in specs if s != "code"] + list(code_corpora().values())
    specs = list(dict.fromkeys(specs))
    limit = stage.options.get("max_files")
    docs = []
    for spec in specs:  # the calibration split only: held-out files stay unseen
        source = state.corpus if spec == state.corpus.spec else read_source(spec, text_field=state.text_field)
        calib, _ = split_documents(source)
        docs += sorted(calib, key=lambda d: d.id)[:limit]
    return specs, docs


def _vocab_stage(lm, stage: Stage, budget: int | None, state: RecipeState) -> dict:
    specs, docs = _corpus_texts(stage, state)
    tok = lm.tokenizer
    counts = count_tokens(tok, tqdm([d.text for d in docs], desc="counting tokens", unit="file", leave=False))
    emb, head = lm.adapter.embed_tokens(), lm.adapter.lm_head()
    tied = head.weight is emb.weight
    per_token = emb.embedding_dim * (1 if tied else 2) + (0 if head.bias is None else 1)
    max_removed = None if budget is None else budget // per_token
    before = emb.num_embeddings
    keep = select_vocab(tok, counts, stage.options.get("min_count", 1), max_removed=max_removed)
    if len(keep) == before:
        return {**_skipped("every token is kept"), "vocab_before": before, "vocab_after": before}
    old_to_new = prune_vocab_(lm, keep)
    remap = state.remap = make_remap(tok, lm.tokenizer, old_to_new)
    L = state.calib_ids.shape[1]
    state.calib_ids = torch.tensor([remap(row)[:L] for row in state.calib_ids], dtype=torch.long)
    used = sum(1 for c in counts.values() if c >= stage.options.get("min_count", 1))
    return {"vocab_before": before, "vocab_after": len(keep), "corpus": specs, "files": len(docs),
            "tokens_counted": sum(counts.values()), "distinct_tokens_used": len(counts),
            "tokens_at_min_count": used,
            "capped": max_removed is not None and before - len(keep) >= max_removed,
            "tied": tied}


def _layers_stage(lm, stage: Stage, budget: int | None, state: RecipeState) -> dict:
    a = lm.adapter
    before = a.num_layers
    if "n" in stage.options:
        n = stage.options["n"]
    else:
        per_layer = decoder_param_count(a) / before
        n = round(budget / per_layer)
    if n >= before:
        raise ConfigError(f"layers stage: would remove {n} of the model's {before} layers")
    metric = stage.options.get("metric", "kl")
    if n < 1:
        return {**_skipped(f"budget {budget:,} is under half a layer"), "metric": metric,
                "removed_layers": [], "layers_before": before, "layers_after": before}
    ids = state.calib_ids[:stage.options.get("samples")]
    ids = ids[:, :stage.options.get("tokens")]
    drop = choose_layers(lm, ids.to(state.device), n, metric=metric,
                         batch_size=stage.options.get("batch_size", state.batch_size))
    remove_layers_(lm, drop)
    return {"metric": metric, "removed_layers": drop, "layers_before": before, "layers_after": a.num_layers,
            "scored_on": {"windows": ids.shape[0], "tokens": ids.shape[1]}}


def _method_stage(lm, stage: Stage, budget: int | None, state: RecipeState) -> dict:
    """A method / ffn / heads stage through the one dispatcher; structured stages at their
    budget's share of the decoder (or their own ``ratio``)."""
    ratio, decoder = None, decoder_param_count(lm.adapter)
    if is_structured(stage.method):
        ratio = stage.options["ratio"] if budget is None else budget / decoder
        if ratio <= 0:
            return _skipped("no budget left")
    method = stage_method(stage, ratio)
    ids = state.calib_ids if method.uses_data else None
    result = run_method(lm, method, ids, device=state.device, offload=state.offload,
                        batch_size=state.batch_size)
    return method_record(lm, method, result, decoder)


def method_record(lm, method, result, decoder_before: int) -> dict:
    """What one method run did, in report fields: its options, then its sparsity (masks) or its
    structure (plan). A single method's report and a sweep member carry these at the top level."""
    fields = {"method_options": dict(vars(method.config))}
    if result.produces is Produces.MASKS:
        actual, per_layer = linear_sparsity(lm.model, result.pruned)
        return fields | {"pruning": "unstructured", "pattern": method.config.pattern,
                         "sparsity_target": method.config.sparsity, "sparsity_actual": actual,
                         "per_layer": per_layer,
                         "note": "zeroed weights are not removed parameters: not counted toward the target"}
    return fields | _plan_fields(lm, method, result, decoder_before)


def _plan_fields(lm, method, result, decoder_before: int) -> dict:
    """What a structured stage did, after checking the plan's parameter count against the model's."""
    plan, decoder = result.plan, decoder_param_count(lm.adapter)
    total = count_parameters(lm.model)[0]
    if plan.planned_params != {"total": total, "decoder": decoder}:  # the plan's count is a contract
        raise RuntimeError(f"plan predicted {plan.planned_params} parameters, surgery gave total {total}, "
                           f"decoder {decoder}")
    fields = {"pruning": "structured", "structure": method.config.structure,
              "compensation": method.config.compensation, "ratio_target": method.config.ratio,
              "ratio_actual_decoder": 1 - decoder / decoder_before, "params_decoder_dense": decoder_before,
              "params_decoder": decoder, "heads_per_layer": plan.heads_per_layer,
              "kv_heads_per_layer": plan.kv_heads_per_layer, "ffn_per_layer": plan.ffn_per_layer,
              "structure_notes": list(plan.notes)}
    grads = result.gradients
    if grads is not None:
        fields["gradient_pass"] = {"samples": grads.samples, "seconds": grads.seconds, "loss": grads.loss,
                                   "peak_cuda_mb": grads.peak_memory_mb,
                                   "checkpointing": method.config.checkpointing}
    return fields
