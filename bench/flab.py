"""Benchmark: Flab-Pruner (``--recipe flab``) at a 22% target, before and after recovery.

Every step is the CLI in its own process (so that each model's peak memory is its
own), outputs under ``--work`` (a step whose output exists is reused: rerun to
resume):

1. ``codeprune eval`` of the dense model: held-out perplexity on every language
   corpus present (``code-ppl``), HumanEval pass@1 on a fixed subset (greedy,
   instruct prompts), parameters, disk, decode tokens/s, peak memory;
2. ``codeprune prune --recipe flab --target 0.22`` (vocabulary counted on the
   calibration split of python-stdlib, layers by KL, FFN by activation);
3. the same evaluation of the pruned model, perplexity per *original* token
   (``--ppl-tokenizer``: the same windows as the dense model);
4. ``codeprune distill-data`` on instruction pairs built from the stdlib's
   calibration split (never the held-out files), then ``codeprune recover`` with
   the paper's LoRA settings (r 64, alpha 32, lr 3e-4, 1 epoch);
5. the same evaluation of the recovered model; a table at the end.

    .venv/bin/python bench/flab.py                        # qwen2.5-coder-0.5b, ~1 h on 2 cores
    .venv/bin/python bench/flab.py --model smollm2-135m --problems 0-9 --distill-examples 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from codeprune.data.calibration import HELDOUT_FRACTION, unit_hash
from codeprune.data.instructions import build_instructions, write_jsonl

CLI = [sys.executable, "-m", "codeprune"]


def step(name: str, out: Path, args: list[str]) -> None:
    """Run one CLI step unless its output exists (resume)."""
    if out.exists():
        print(f"[{name}] reusing {out}", flush=True)
        return
    print(f"[{name}] {' '.join(args)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(CLI + args, check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)


def instruction_file(path: Path, n: int) -> Path:
    """``n`` short docstring -> body pairs from the stdlib's calibration split, spread by hash."""
    if path.exists():
        return path
    records, _ = build_instructions("python-stdlib", eval_fraction=0.1)
    records = [r for r in records if unit_hash(r["source"].rsplit(":", 1)[0]) >= HELDOUT_FRACTION
               and len(r["output"]) <= 600 and len(r["instruction"]) <= 400]
    records.sort(key=lambda r: unit_hash(r["source"]))
    return write_jsonl(records[:n], path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--target", type=float, default=0.22)
    ap.add_argument("--recipe", default="flab")
    ap.add_argument("--work", default="runs/bench-flab", help="outputs (reused when present)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--problems", default="0-19", help="the fixed HumanEval subset (indices)")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--distill-examples", type=int, default=48)
    ap.add_argument("--rec-seq-len", type=int, default=256)
    ap.add_argument("--no-recover", action="store_true", help="stop after evaluating the pruned model")
    args = ap.parse_args()

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(args.recipe).stem}-{round(args.target * 100)}"
    pruned, rec = work / f"pruned-{tag}", work / f"rec-{tag}"

    def evaluate(name: str, model: str, extra: list[str]) -> Path:
        out = work / f"eval-{name}"
        step(f"eval {name}", out, ["eval", "--model", model, "--ppl", "code-ppl", "--windows",
                                   str(args.ppl_windows), "--seq-len", str(args.ppl_seq_len), "--humaneval",
                                   "--prompt-format", "instruct", "--problems", args.problems,
                                   "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), *extra])
        return out

    evals = {"dense": evaluate("dense", args.model, [])}
    step("prune", pruned, ["prune", "--model", args.model, "--recipe", args.recipe,
                           "--target", str(args.target), "--calib", "python-stdlib",
                           "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                           "--eval-windows", "16", "--out", str(pruned)])
    evals["pruned"] = evaluate(f"pruned-{tag}", str(pruned), ["--ppl-tokenizer", args.model])
    if args.no_recover:
        report(args, work, evals, pruned, None, None)
        return
    data = instruction_file(work / "instr.jsonl", args.distill_examples)
    distilled = work / f"distill-{tag}.jsonl"
    step("distill-data", distilled, ["distill-data", "--original", args.model, "--pruned", str(pruned),
                                     "--data", str(data), "--max-new-tokens", "128", "--out", str(distilled),
                                     "--json"])
    step("recover", rec, ["recover", "--model", str(pruned), "--data", str(distilled), "--out", str(rec),
                          "--lora-r", "64", "--lora-alpha", "32", "--lr", "3e-4", "--epochs", "1",
                          "--batch-size", "4", "--grad-accum", "1", "--seq-len", str(args.rec_seq_len),
                          "--eval-fraction", "0.1", "--eval-data", "none"])
    evals["recovered"] = evaluate(f"recovered-{tag}", str(rec), ["--ppl-tokenizer", args.model])
    report(args, work, evals, pruned, rec, distilled)


def report(args, work: Path, evals: dict, pruned: Path, rec: Path | None, distilled: Path | None) -> None:
    reports = {k: json.loads((v / "report.json").read_text()) for k, v in evals.items()}
    prune_report = json.loads((pruned / "report.json").read_text())
    line = (f"\n{args.model}, recipe {args.recipe}, target {args.target:.0%}: removed "
            f"{prune_report['ratio_actual_total']:.2%} of all parameters "
            f"({prune_report['params_dense']:,} -> {prune_report['params_total']:,}); "
            f"prune {prune_report['seconds_prune']:.0f} s")
    if rec is not None:
        rec_report = json.loads((rec / "report.json").read_text())
        distilled_rows = [json.loads(x) for x in distilled.read_text().splitlines()]
        line += (f", recovery {rec_report['seconds']:.0f} s on {len(distilled_rows)} distilled examples "
                 f"({sum(r['distill']['target'] == 'original' for r in distilled_rows)} with the "
                 "original's answer)")
    print(line)
    print("\n| stage | removed params | % of dense | ppl after (python-stdlib, per original token) | what |")
    print("|---|---|---|---|---|")
    for st in prune_report["stages"]:
        if st.get("skipped"):
            what = f"skipped: {st['skipped']}"
        elif st["stage"] == "vocab":
            what = f"vocab {st['vocab_before']:,} -> {st['vocab_after']:,}"
        elif st["stage"] == "layers":
            what = f"layers {st['layers_before']} -> {st['layers_after']} (removed {st['removed_layers']})"
        else:
            what = f"FFN width {sorted(set(st['ffn_per_layer']))}"
        ppl = f"{st['ppl']:.3f}" if st.get("ppl") else "-"
        print(f"| {st['stage']} | {st['removed_params']:,} | {st['removed_fraction']:.2%} | {ppl} | {what} |")
    langs = list(reports["dense"]["perplexity"])
    print("\n| model | params | disk MB | decode tok/s (b1) | peak RSS MB | pass@1 | "
          + " | ".join(f"ppl {k.split(':')[0]}" for k in langs) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(langs))
    for name, r in reports.items():
        eff, he = r["efficiency"], r["humaneval"]
        ppl = " | ".join(f"{r['perplexity'][k]['ppl']:.3f}" for k in langs)
        print(f"| {name} | {eff['params_total']:,} | {eff['disk_bytes'] / 2**20:.0f} | "
              f"{eff['speed']['batch_1']['decode_tok_s']:.1f} | {eff['peak_memory_mb']:.0f} | "
              f"{he['pass@1']:.3f} ({he['statuses']['passed']}/{he['n_problems']}) | {ppl} |")
    dense_p1 = reports["dense"]["humaneval"]["pass@1"]
    for name in [n for n in ("pruned", "recovered") if n in reports]:
        kept = reports[name]["humaneval"]["pass@1"] / dense_p1 if dense_p1 else float("nan")
        print(f"{name}: {kept:.0%} of the dense pass@1 kept (the paper: 97% at 22% on 7B models before "
              "post-training, the original's level after it)")


if __name__ == "__main__":
    main()
