"""Running a recipe: its stages in order, each within its share of the target.

    records = run_recipe(lm, load_recipe("flab"), target=0.22, state=RecipeState(...))

``vocab`` and ``layers`` stages call methods/vocab.py and methods/depth.py; every
other stage is a registered method run through ``methods.run_method`` (a single
``codeprune prune --method X`` is a one-stage recipe: workflows/prune.py). Each
stage returns a record (what it removed, its time, what it did); the prune
workflow turns the records into the report.

``check_reach(lm, recipe, target)`` runs before any calibration (workflows/prune.py
calls it right after loading): it plays the budget split on the model's shapes,
every vocab stage dropping all it may (all but the special tokens and the byte
alphabet), and refuses a target the stages cannot remove - a layers stage keeps
one layer, a structured stage what methods/structured/search.py ``reach`` says -
with the largest reachable target; a structured stage's own ``ratio`` likewise.

    codeprune prune --model smollm2-135m --recipe shortgpt --target 0.9   # exit 2: the largest is 0.776
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from codeprune.data import read_source
from codeprune.data.calibration import split_documents
from codeprune.data.sources import code_corpora
from codeprune.errors import ConfigError
from codeprune.methods import Produces, is_structured, run_method
from codeprune.methods.depth import choose_layers, remove_layers_
from codeprune.methods.structured.base import scope_layers
from codeprune.methods.structured.plan import decoder_param_count
from codeprune.methods.structured.search import check_reachable, floor3, reach
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
    check_reach(lm, recipe, target)
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
    ratio, decoder, capped = None, decoder_param_count(lm.adapter), False
    if is_structured(stage.method):
        ratio = stage.options["ratio"] if budget is None else budget / decoder
        if ratio <= 0:
            return _skipped("no budget left")
        if budget is not None:  # earlier stages removed less than check_reach assumed: take the most
            most = floor3(reach(lm, stage_method(stage, min(ratio, 0.5)).config).ratio)
            ratio, capped = min(ratio, most), ratio > most
    method = stage_method(stage, ratio)
    ids = state.calib_ids if method.uses_data else None
    result = run_method(lm, method, ids, device=state.device, offload=state.offload,
                        batch_size=state.batch_size)
    record = method_record(lm, method, result, decoder)
    return record | ({"capped": f"budget {budget:,} is over what the stage can remove"} if capped else {})


@dataclass
class _Limits:
    """What the stages of a recipe can remove at most, from the dense model's shapes."""

    params: int  # all parameters
    layers: int
    per_layer: float  # decoder parameters per layer (layers alike)
    stages: list  # per stage: vocab (tokens it may drop, parameters per token, tokens); structured: a Reach


def check_reach(lm, recipe: Recipe, target: float | None) -> None:
    """ConfigError, before any data is read, when ``recipe``'s stages cannot remove ``target`` of
    all parameters (the message gives the largest target they can), or a structured stage its own
    ``ratio`` (a single ``--method`` run: ``search.check_reachable``'s message)."""
    if target is None and len(recipe.stages) == 1 and is_structured(recipe.stages[0].method):
        check_reachable(lm, stage_method(recipe.stages[0]))
        return
    limits = _limits(lm, recipe)
    failure = _play(recipe, target or 0.0, limits)
    if failure is None:
        return
    best = max((k / 2000 for k in range(1, 2000) if _play(recipe, k / 2000, limits) is None), default=None)
    what = f"target {target:g}" if target is not None else "the fixed amounts of its stages"
    tail = (f"; the largest target these stages can take is {floor3(best):.3f} (of all parameters)"
            if best is not None and target is not None else "")
    vocab = [lim for lim in limits.stages if isinstance(lim, tuple)]
    if vocab and target is not None:
        tail += (f" (counting every token the vocab stage may drop: all but {vocab[0][2] - vocab[0][0]:,} "
                 f"of {vocab[0][2]:,}, the special tokens and the byte alphabet)")
    raise ConfigError(f"{what} cannot be reached by recipe {recipe.name} on {lm.name}: {failure}{tail}")


def _limits(lm, recipe: Recipe) -> _Limits:
    from codeprune.methods.vocab import select_vocab  # vocab stages only: it reads the tokenizer

    a, stages = lm.adapter, []
    for stage in recipe.stages:
        if stage.kind == "vocab":
            emb, head = a.embed_tokens(), a.lm_head()
            per_token = emb.embedding_dim * (1 if head.weight is emb.weight else 2) + (head.bias is not None)
            floor = len(select_vocab(lm.tokenizer, Counter(), 1))  # special tokens and the byte alphabet
            stages.append((emb.num_embeddings - floor, per_token, emb.num_embeddings))
        elif stage.kind != "layers" and is_structured(stage.method):
            ratio = stage.options.get("ratio", 0.5)
            stages.append(reach(lm, stage_method(stage, ratio).config))
        else:
            stages.append(None)
    params = sum(p.numel() for p in lm.model.parameters())  # tied embeddings once
    return _Limits(params, a.num_layers, decoder_param_count(a) / a.num_layers, stages)


def _play(recipe: Recipe, target: float, lim: _Limits) -> str | None:
    """Run the budget split of ``run_recipe`` on the shapes alone; the first stage that cannot
    take its part, in words, or None when every stage can."""
    goal, removed, layers, per_layer = round(target * lim.params), 0.0, lim.layers, lim.per_layer
    for k, stage in enumerate(recipe.stages):
        budget, where = None, f"stage {k + 1} ({stage.kind})"
        if stage.share is not None:
            weights = sum(recipe.stages[j].share for j in recipe.budgeted if j >= k)
            budget = max(0, round((goal - removed) * stage.share / weights))
        limit = lim.stages[k]
        if stage.kind == "vocab":
            tokens, per_token, _ = limit
            removed += (tokens if budget is None else min(budget // per_token, tokens)) * per_token
        elif stage.kind == "layers":
            n = stage.options["n"] if "n" in stage.options else round(budget / per_layer)
            if n >= layers:
                return f"{where} would remove {n} of the {layers} layers left, and keeps at least one"
            layers, removed = layers - n, removed + n * per_layer
        elif limit is not None:
            decoder = layers * per_layer
            ratio = stage.options["ratio"] if budget is None else budget / decoder
            most = _scaled(limit, stage, layers, lim.per_layer)
            if ratio > most:
                return (f"{where} would remove {ratio:.3f} of the decoder-layer parameters left, and "
                        f"{limit.why}: at most {floor3(most):.3f}")
            removed, per_layer = removed + max(ratio, 0.0) * decoder, per_layer * (1 - max(ratio, 0.0))
    return None


def _scaled(limit, stage: Stage, layers: int, per_layer_dense: float) -> float:
    """A structured stage's largest ratio once only ``layers`` layers are left (layers alike)."""
    try:
        in_scope = len(scope_layers(stage_method(stage, 0.5).config.scope, layers))
    except ConfigError:  # the scope selects no layer of so few
        return 0.0
    return in_scope * (limit.removable / limit.in_scope) / (layers * per_layer_dense)


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
