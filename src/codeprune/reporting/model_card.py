"""The model card (README.md) of every checkpoint folder codeprune writes.

    from functools import partial
    save_checkpoint(lm, out, extra=writes_report(record), card=partial(render_model_card, record))
    render_model_card(report, needs_remote_code=False, dtype="bfloat16")   # -> "---\\nbase_model: ..."

The card starts with the Hugging Face YAML front matter (the hub's model-card
metadata: base_model, license, tags, pipeline_tag, library_name), then says what
was done (method, pattern / ratio, recipe stages, or the LoRA recovery), the exact
command (``provenance.command``; "the Python API" when there is none), the key
figures (parameters, sparsity or ratio, perplexity dense -> pruned, weights dtype
and size on disk), and how to load the folder. ``base_model`` and ``license``
come from the report's ``source`` (models/loading.py records them in
``LoadedModel.origin``): an offline alias names the hub model its GGUF was made
from; a folder written by codeprune passes its own card's values on.
"""

from __future__ import annotations

import yaml

from codeprune.reporting.formatting import fmt, megabytes
from codeprune.reporting.markdown import kv_table


def render_model_card(report, *, needs_remote_code: bool, dtype: str | None = None) -> str:
    """README.md of a checkpoint folder from its report (a schema record or its dict);
    ``needs_remote_code``: the folder ships modeling_codeprune.py; ``dtype``: of the saved weights."""
    r = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
    source = r.get("source") or {}
    lines = ["---", yaml.safe_dump(front_matter(r), sort_keys=False).rstrip(), "---", "",
             f"# {_title(r)}", "", _what(r, source), ""]
    lines += _stages(r)
    lines += ["## How it was made", ""]
    command = (r.get("provenance") or {}).get("command")
    lines += ["```bash", command, "```"] if command else ["With codeprune's Python API (no command line)."]
    lines += ["", "## Key figures", "", *kv_table(_figures(r, dtype)), ""]
    if dtype:  # the run measures before saving; a narrower dtype rounds the weights
        lines += [f"The figures were measured on the model in memory, before its weights were saved in "
                  f"{dtype}.", ""]
    if r.get("ppl_protocol"):
        lines += [f"Perplexity protocol: {r['ppl_protocol']}.", ""]
    lines += _how_to_load(needs_remote_code)
    notes = [*r.get("notes", []), *(r.get("structure_notes") or [])]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["report.json and report.md beside the weights hold every figure of the run.", ""]
    return "\n".join(lines)


def front_matter(r: dict) -> dict:
    """The card's YAML metadata (https://huggingface.co/docs/hub/model-cards#model-card-metadata)."""
    source = r.get("source") or {}
    method = str(r.get("method") or "").removeprefix("recipe:")
    tags = ["pruned", "codeprune", method, source.get("model_type")]
    if r.get("kind") == "recover":
        tags[2:3] = ["lora" if r.get("lora") else "full-fine-tuning", "recovered"]
        if r.get("kd"):
            tags.append("knowledge-distillation")
    tags += [st.get("method") for st in r.get("stages") or []]
    meta = {"base_model": source.get("base_model"), "license": source.get("license"),
            "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": [t for t in dict.fromkeys(tags) if t]}
    return {k: v for k, v in meta.items() if v is not None}


def _title(r: dict) -> str:
    if r.get("kind") == "recover":
        how = "LoRA" if r.get("lora") else "full fine-tuning"
        kd = " and distillation" if r.get("kd") else ""
        return f"{r.get('model')}, recovered with {how}{kd} (codeprune)"
    method = str(r.get("method"))
    if method.startswith("recipe:"):
        return f"{r.get('model')}, pruned with the {method.removeprefix('recipe:')} recipe (codeprune)"
    return f"{r.get('model')}, pruned with {method} (codeprune)"


def _what(r: dict, source: dict) -> str:
    """One paragraph: the source, then what was done to it."""
    base = source.get("base_model")
    origin = f"`{r.get('model')}`"
    if base:
        origin += f" (base model [{base}](https://huggingface.co/{base}))"
    if r.get("kind") == "recover":
        lora, kd = r.get("lora"), r.get("kd")
        how = (f"LoRA fine-tuning (r {lora.get('r')}, alpha {lora.get('alpha')}, " if lora
               else "full fine-tuning (")
        goal = f"distilled from `{kd.get('teacher')}` " if kd else ""
        merged = "merged into the weights; " if lora else ""
        return (f"{origin} after {how}{r.get('steps')} steps on `{(r.get('data') or {}).get('spec')}`"
                f"{', ' + goal.strip() if goal else ''}), {merged}the zeros of sparse Linears are kept.")
    pruning = r.get("pruning")
    if pruning == "recipe":
        recipe = r.get("recipe") or {}
        done = (f"pruned by the recipe `{recipe.get('name')}` ({len(r.get('stages') or [])} stages, "
                f"target {fmt(r.get('target'), '.1%') if r.get('target') is not None else 'none'})")
    elif pruning == "structured":
        done = (f"pruned with {r.get('method')}: {r.get('structure')} removed, ratio "
                f"{fmt(r.get('ratio_target'), '.1%')} of the decoder (rows and heads are removed, "
                "shapes shrink)")
    else:
        done = (f"pruned with {r.get('method')}: {r.get('pattern')} sparsity "
                f"{fmt(r.get('sparsity_target'), '.1%')} (weights set to zero, shapes unchanged)")
    note = " Its weights were dequantized from a quantized GGUF file." if source.get("quantization") else ""
    return f"{origin} {done}.{note}"


def _stages(r: dict) -> list[str]:
    stages = r.get("stages") or []
    if not stages:
        return []
    lines = ["## Stages", "", "| # | stage | method | removed | parameters after |", "|---|---|---|---|---|"]
    for i, st in enumerate(stages, 1):
        lines.append(f"| {i} | {st.get('stage', '')} | {st.get('method') or ''} | "
                     f"{_pct(st.get('removed_fraction')) or ''} | {fmt(st.get('params_after'))} |")
    return [*lines, ""]


def _figures(r: dict, dtype: str | None) -> list[tuple[str, object]]:
    eff = r.get("efficiency") or {}
    disk = eff.get("disk_bytes")
    if r.get("kind") == "recover":
        rows = [("parameters", r.get("params_total")),
                ("sparsity of the decoder Linears", _pct(r.get("sparsity_after"))),
                ("perplexity before -> after recovery", _arrow(r.get("ppl_before"), r.get("ppl_after"))),
                ("eval loss before -> after", _arrow(r.get("eval_loss_before"), r.get("eval_loss_after")))]
    else:
        ratio = r.get("ratio_actual_total")
        rows = [("parameters before -> after", _arrow(r.get("params_dense"), r.get("params_total"))),
                ("nonzero parameters", r.get("params_nonzero")),
                ("sparsity of the pruned Linears", _pct(r.get("sparsity_actual"))),
                ("parameters removed", _pct(ratio)),
                ("perplexity dense -> pruned", _arrow(r.get("ppl_dense"), r.get("ppl_pruned")))]
    rows += [("weights", f"{dtype} safetensors" if dtype else None),
             ("size on disk", megabytes(disk) if disk else None)]
    return rows


def _how_to_load(needs_remote_code: bool) -> list[str]:
    if needs_remote_code:
        return ["## How to load", "",
                "The layers have different sizes (or carry extra biases), which plain transformers cannot "
                "build: the folder ships `modeling_codeprune.py`.", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
                "# or: import codeprune; lm = codeprune.load(\"path/to/this/folder\")", "```", ""]
    return ["## How to load", "", "A plain transformers checkpoint:", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]


def _arrow(a, b) -> str | None:
    if a is None and b is None:
        return None
    return f"{fmt(a) or '?'} -> {fmt(b) or '?'}"


def _pct(x) -> str | None:
    return None if x is None else fmt(x, ".1%")
