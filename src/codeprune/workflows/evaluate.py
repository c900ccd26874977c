"""Evaluate a model (``codeprune eval``): held-out perplexity, HumanEval pass@k, efficiency.

    codeprune eval --model runs/wanda50 --ppl code-ppl --humaneval --out runs/wanda50-eval
    codeprune eval --humaneval --completions samples.jsonl     # score completions made elsewhere

``evaluate`` runs named steps: check the options, read the sources (before any
model is loaded), load, score perplexity, run HumanEval, measure efficiency,
write report.json / report.md (reporting/schema.py ``EvalReport``) and the
HumanEval samples, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from codeprune.calibration.devices import place_model, resolve_device
from codeprune.data import heldout_windows, read_source
from codeprune.data.calibration import check_window_sizes
from codeprune.data.sources import LANGUAGES, code_corpora
from codeprune.errors import ConfigError
from codeprune.evaluation.efficiency import efficiency_report
from codeprune.evaluation.humaneval import HumanEvalConfig, run_humaneval, write_samples
from codeprune.evaluation.perplexity import perplexity, perplexity_remapped, protocol
from codeprune.evaluation.sandbox import check_sandbox
from codeprune.methods.vocab import id_map, make_remap
from codeprune.models.checkpoint import needs_modeling_file
from codeprune.models.counting import count_parameters, decoder_sparsity
from codeprune.models.loading import LoadedModel, gguf_tokenizer, load_tokenizer
from codeprune.outputs import write_atomically
from codeprune.reporting.provenance import display_name, sanitise_source
from codeprune.reporting.schema import Efficiency, EvalReport, HumanEval, LlamaCppRun, PerplexityScore, Source
from codeprune.reporting.writer import write_report
from codeprune.workflows.common import as_loaded, check_out, releasing_outputs


@dataclass
class _Plan:
    """What an evaluation will do, decided before any model is loaded."""

    he: HumanEvalConfig | None
    corpora: list  # the source specs asked for; [(Corpus, language or None)] once read
    needs_model: bool
    efficiency: bool
    vllm: bool  # HumanEval generates with vLLM, which loads the model itself

    @property
    def generates(self) -> bool:
        return self.he is not None and self.he.completions is None


def _ppl_sources(ppl) -> list[tuple[str, str | None]]:
    """[(source spec, language or None)], with ``code-ppl`` expanded to the corpora present."""
    out: list[tuple[str, str | None]] = []
    for spec in ppl:
        if spec == "code-ppl":
            out += [(s, lang) for lang, s in code_corpora().items()]
        else:
            head = spec.split(":", 1)[0]
            lang = head if head in LANGUAGES and ":" in spec else None
            out.append((spec, "python" if spec == "python-stdlib" else lang))
    return list(dict.fromkeys(out))


def _check_vllm(model) -> None:
    """vLLM serves plain checkpoints named by folder, alias or hub id."""
    if isinstance(model, LoadedModel):
        raise ConfigError("--backend vllm loads the model itself: give a folder, alias or hub id")
    folder = Path(str(model)).expanduser()
    if (folder / "config.json").is_file():
        from transformers import AutoConfig

        if needs_modeling_file(AutoConfig.from_pretrained(folder)):
            raise ConfigError(f"{model} has per-layer sizes or extra biases (modeling_codeprune.py), "
                              "which vLLM cannot serve: use --backend hf")


def _plan(model, ppl, humaneval, efficiency: bool) -> _Plan:
    """Check the options (no I/O yet): what to score, and whether a model is needed."""
    he = HumanEvalConfig() if humaneval is True else humaneval or None
    if ppl is None:
        ppl = [] if he else ["python-stdlib"]
    efficiency = efficiency and model is not None
    needs_model = bool(ppl) or efficiency or (he is not None and he.completions is None)
    if needs_model and model is None:
        raise ConfigError("give --model (only --humaneval --completions FILE works without one)")
    return _Plan(he, list(ppl), needs_model, efficiency, vllm=False)


def _read_sources(plan: _Plan, model, seq_len: int, windows: int, text_field: str) -> None:
    """Read every perplexity source and check the sandbox and backend: fail fast, before
    minutes of loading."""
    check_window_sizes(windows, seq_len)
    specs = _ppl_sources(plan.corpora)
    plan.corpora = [(read_source(src, text_field=text_field), lang) for src, lang in specs]
    if plan.generates:
        check_sandbox(plan.he.limits)  # before minutes of generation
        plan.vllm = plan.he.backend == "vllm"
    if plan.vllm:
        _check_vllm(model)
        plan.efficiency = False  # measured on the HF copy, it would not describe vLLM's serving


def _perplexities(lm: LoadedModel, corpora, *, seq_len: int, windows: int, dev, offload: bool,
                  ppl_tokenizer: str | None) -> dict[str, PerplexityScore]:
    """Held-out perplexity per source; with ``ppl_tokenizer``, windows cut by that tokenizer
    and scored per its tokens."""
    if ppl_tokenizer is not None and offload:
        raise ConfigError("--ppl-tokenizer scores on one device: drop --offload")
    window_tok, remap, note = _window_tokenizer(lm.tokenizer, ppl_tokenizer)
    results = {}
    for corpus, lang in corpora:
        held = heldout_windows(window_tok, corpus, seq_len=seq_len, max_windows=windows)
        if remap is not None:
            scores = perplexity_remapped(lm, held, remap, desc=f"ppl {corpus.spec}")
        else:
            scores = perplexity(lm, held, desc=f"ppl {corpus.spec}", offload_device=dev if offload else None)
        key = display_name(corpus.spec)  # no absolute local path in the report
        results[key] = PerplexityScore(**scores, language=lang, protocol=protocol(held, key) + note)
    return results


def _window_tokenizer(tokenizer, ppl_tokenizer: str | None):
    """(tokenizer that cuts the windows, remap to ``tokenizer`` or None, protocol note): with
    ``ppl_tokenizer`` the windows are the original model's, rewritten for a pruned vocabulary."""
    if ppl_tokenizer is None:
        return tokenizer, None, ""
    window_tok = load_tokenizer(ppl_tokenizer)
    remap = make_remap(window_tok, tokenizer, id_map(window_tok, tokenizer))
    note = f"; windows cut by the tokenizer of {display_name(ppl_tokenizer)}, ppl per its tokens"
    return window_tok, remap, note


def _humaneval(he: HumanEvalConfig, lm: LoadedModel | None, model) -> tuple[HumanEval, list[dict]]:
    """The HumanEval section (paths in its config as a report shows them) and the samples."""
    path = lm.origin.get("path") if lm is not None else None
    section, samples = run_humaneval(he, lm, model_path=path or model)
    cfg = section["config"]
    for key in ("completions", "problems_file"):
        cfg[key] = display_name(cfg.get(key))
    return HumanEval.from_dict(section, "humaneval"), samples


def _efficiency(lm: LoadedModel) -> Efficiency:
    path = lm.origin.get("path")
    folder = Path(path) if path and Path(path).is_dir() else None  # a hub id has no folder
    return Efficiency.from_dict(efficiency_report(lm, checkpoint=folder), "efficiency")


RUNTIMES = ("transformers", "llama.cpp")


def _check_runtime(runtime: str, model, plan: _Plan, threads: int | None, offload: bool) -> None:
    """llama.cpp runs a .gguf file: perplexity and speed, no HumanEval (before any work)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}': choose {' or '.join(RUNTIMES)}")
    if threads is not None and (runtime != "llama.cpp" or threads < 1):
        raise ConfigError("--threads takes a count >= 1 and goes with --runtime llama.cpp")
    if runtime == "transformers":
        return
    if offload:
        raise ConfigError("--offload is for the transformers runtime; llama.cpp runs the GGUF on the CPU")
    if isinstance(model, LoadedModel) or not str(model).endswith(".gguf"):
        raise ConfigError("--runtime llama.cpp runs a .gguf file: export the run first "
                          "(codeprune export RUN --gguf FILE.gguf)")
    if not Path(str(model)).expanduser().is_file():
        raise ConfigError(f"no such .gguf file: {model}")
    if plan.he is not None:
        raise ConfigError("--runtime llama.cpp measures perplexity and speed; HumanEval runs in transformers "
                          "or vLLM (drop --humaneval, or evaluate the checkpoint)")


def _llama_cpp(report: EvalReport, plan: _Plan, path: Path, *, seq_len: int, windows: int,
               threads: int | None, ppl_tokenizer: str | None) -> None:
    """Perplexity per source and batch-1 speed of a GGUF file in llama.cpp, into ``report``."""
    import gguf

    from codeprune.evaluation.llamacpp import LlamaCpp, version

    window_tok, remap, note = _window_tokenizer(gguf_tokenizer(path), ppl_tokenizer)
    report.runtime = "llama.cpp"
    helds = [(corpus, lang, heldout_windows(window_tok, corpus, seq_len=seq_len, max_windows=windows))
             for corpus, lang in plan.corpora]
    n_ctx = max([seq_len, 256] + [len(remap(row)) for *_, held in helds if remap
                                  for row in held.input_ids.tolist()])  # removed tokens split in several
    with LlamaCpp(path, n_ctx=n_ctx, threads=threads) as rt:
        report.params_total = rt.n_params
        results = {}
        for corpus, lang, held in helds:
            scores = rt.perplexity(held, remap=remap, name=display_name(str(path)), desc=f"ppl {corpus.spec}")
            scores.pop("runtime")
            key = display_name(corpus.spec)
            results[key] = PerplexityScore(**scores, language=lang,
                                           protocol=protocol(held, key) + note + "; run in llama.cpp")
        report.perplexity = results or None
        if plan.efficiency:
            meta = rt.metadata()
            try:
                ftype = gguf.LlamaFileType(int(meta.get("general.file_type", -1))).name
            except ValueError:
                ftype = None
            report.llama_cpp = LlamaCppRun(file_bytes=path.stat().st_size,
                                           architecture=meta.get("general.architecture"),
                                           file_type=ftype and ftype.removeprefix("MOSTLY_").lower(),
                                           threads=rt.threads, speed=rt.speed(), llama_cpp_python=version())


@releasing_outputs
def evaluate(model: str | LoadedModel | None = None, *, ppl: list[str] | tuple[str, ...] | None = None,
             humaneval: bool | HumanEvalConfig = False, efficiency: bool = True, seq_len: int = 512,
             windows: int = 32, device: str = "cpu", text_field: str = "text", offload: bool = False,
             dtype: str | torch.dtype = "float32", out: str | Path | None = None,
             overwrite: bool = False, ppl_tokenizer: str | None = None, runtime: str = "transformers",
             threads: int | None = None) -> dict:
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
    (evaluation/perplexity.py ``perplexity_remapped``), so the figure compares with the original's.
    ``runtime="llama.cpp"`` runs a .gguf ``model`` in llama.cpp instead (evaluation/llamacpp.py):
    the same perplexity windows, and batch-1 prefill / decode speed with ``threads`` threads
    (default one per core) in place of the efficiency section.
    Returns report.json's content (reporting/schema.py ``EvalReport``), plus "out" when written."""
    plan = _plan(model, ppl, humaneval, efficiency)
    _check_runtime(runtime, model, plan, threads, offload)
    check_out(out, overwrite, model, *(ppl or ()))
    dev = resolve_device(device)
    _read_sources(plan, model, seq_len, windows, text_field)
    name = model.name if isinstance(model, LoadedModel) else model
    report = EvalReport(model=display_name(name) if name is not None else None)
    lm = None
    if runtime == "llama.cpp":
        _llama_cpp(report, plan, Path(str(model)).expanduser(), seq_len=seq_len, windows=windows,
                   threads=threads, ppl_tokenizer=ppl_tokenizer)
    elif plan.needs_model:
        lm = as_loaded(model, dtype, seq_len)
        if not offload and not plan.vllm:  # offload: perplexity brings one layer at a time to the device
            place_model(lm, dev)
        report.model = display_name(lm.name)
        report.source = Source.from_dict(sanitise_source(lm.origin, lm.name), "source")
        report.sparsity = decoder_sparsity(lm)
        report.params_total, report.params_nonzero = count_parameters(lm.model)
    if plan.corpora and runtime != "llama.cpp":
        report.perplexity = _perplexities(lm, plan.corpora, seq_len=seq_len, windows=windows, dev=dev,
                                          offload=offload, ppl_tokenizer=ppl_tokenizer)
    if offload and not plan.vllm and (plan.efficiency or plan.generates):
        place_model(lm, dev)  # generation and speed need the whole model on the device
    samples = None
    if plan.he is not None:
        report.humaneval, samples = _humaneval(plan.he, lm, model)
    if plan.efficiency and runtime != "llama.cpp":
        report.efficiency = _efficiency(lm)
    result = report.to_dict()
    if out is not None:
        result["out"] = str(write_eval_report(out, report, samples, overwrite=overwrite))
    return result


def write_eval_report(out: str | Path, report: EvalReport, samples: list[dict] | None, *,
                      overwrite: bool = False) -> Path:
    """report.json, report.md and the HumanEval samples of one eval run, written atomically."""

    def fill(tmp: Path) -> None:
        write_report(tmp, report)
        if samples is not None:
            write_samples(tmp / "humaneval_samples.jsonl", samples)

    return write_atomically(out, overwrite, fill)
