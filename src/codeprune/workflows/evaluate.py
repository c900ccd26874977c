"""evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.errors import ConfigError
from codeprune.evaluation.humaneval import HumanEvalConfig, run_humaneval, write_samples
from codeprune.evaluation.perplexity import perplexity, perplexity_remapped, protocol
from codeprune.models.counting import count_parameters, decoder_sparsity
from codeprune.models.loading import LoadedModel
from codeprune.outputs import check_output
from codeprune.workflows.common import _as_loaded


def _ppl_sources(ppl) -> list[tuple[str, str | None]]:
    """[(source spec, language or None)], with ``code-ppl`` expanded to the corpora present."""
    from codeprune.data.sources import LANGUAGES, code_corpora

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
        from codeprune.evaluation.sandbox import check_sandbox

        check_sandbox(he.limits)  # before minutes of generation
    vllm = he is not None and he.completions is None and he.backend == "vllm"
    if vllm:
        if isinstance(model, LoadedModel):
            raise ConfigError("--backend vllm loads the model itself: give a folder, alias or hub id")
        folder = Path(str(model)).expanduser()
        if (folder / "config.json").is_file():
            from transformers import AutoConfig

            from codeprune.models.checkpoint import needs_modeling_file

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
            from codeprune.methods.vocab import id_map, make_remap
            from codeprune.models.loading import load_tokenizer

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
        from codeprune.evaluation.efficiency import efficiency_report

        path = lm.origin.get("path")
        folder = Path(path) if path and Path(path).is_dir() else None  # a hub id has no folder
        result["efficiency"] = efficiency_report(lm, checkpoint=folder)
    if out is not None:
        result["out"] = str(write_eval_report(out, result, samples, overwrite=overwrite))
    return result


def write_eval_report(out: str | Path, result: dict, samples: list[dict] | None, *,
                      overwrite: bool = False) -> Path:
    """report.json, report.md and the HumanEval samples of one eval run, written atomically."""
    from codeprune.outputs import write_atomically
    from codeprune.reporting.markdown import render_eval_markdown

    def fill(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "report.md").write_text(render_eval_markdown(result))
        if samples is not None:
            write_samples(tmp / "humaneval_samples.jsonl", samples)

    return write_atomically(out, overwrite, fill)
