"""Benchmark: recovery that keeps coding ability, on qwen2.5-coder-0.5b.

Rows: the dense model, FLAP 20% (adaptive, compensated: the better of adaptive
and uniform in the README's structured table), LLM-Pruner Taylor element1 20%,
Flab-Pruner 22%; each before recovery, after LoRA SFT on completion-style pairs
(``instructions --style completion``: the format HumanEval instruct is
evaluated in), after KD (LoRA, logit distillation from the dense model on
``code-ppl``) and after KD on the SFT pairs (``kd-pairs``: the same
distillation, on the answers of the completion-style pairs) and after KD on
Flab-Pruner's data (``kd-distill``: the stdlib's functions with doctests as
completion-style pairs, ``instructions --with-tests``; ``distill-data`` keeps those
the pruned model fails, with the dense model's answer as the target where it passes
the doctests; KD on them, repeated to the same token budget). Every step is the
CLI in its own process, outputs under ``--work`` (a step whose output exists is
reused: rerun to resume).

The benchmark takes longer than one sitting, and its models take gigabytes, so the
small part that matters is kept apart: each finished evaluation's and recovery's
report.json is copied to ``--results`` (default ``bench/results/recovery``; the
32k-token run's are committed in ``bench/results/recovery-32k``).
A step whose result is there is never rerun, and the models it would have needed
are never built: a later session on a fresh machine goes on where the last one
stopped, rebuilding only what a missing result needs. ``--results`` holds the
settings it was made with (settings.json) and refuses others; the evaluations
that the recovery settings (``--tokens``, ``--lr``, ``--rec-seq-len``, ``--kd-alpha``) do
not change, the dense model's and each row's before recovery, are taken from a folder
beside it made with the same other settings (a new ``--lr`` does not rerun the dense
model). ``--kd-alpha`` is recorded only when given, so folders made before it stay valid.

- HumanEval pass@1, greedy, instruct prompts: all 164 problems for the dense model
  and after KD (``--full-problems``), a fixed 40-problem subset (every fourth
  problem) for the other rows (``--subset``; ``--before-problems all`` evaluates the
  pruned rows on all 164 too); about 40 minutes per 164 on 2 cores.
- Held-out perplexity on every language corpus here (``code-ppl``), per original
  token for the vocabulary-pruned model (``--ppl-tokenizer``).
- Recovery wall time, tokens and tokens/s (report.json of ``recover``).

SFT and both KDs get the same budget: ``--tokens`` training tokens, one epoch, LoRA
r 8 / alpha 16, lr ``--lr``, windows of ``--rec-seq-len``. The SFT pairs come
from the standard library's calibration split (never a held-out file), the KD
windows from the calibration splits of ``code-ppl``.

    .venv/bin/python bench/recovery.py                                   # hours: run it alone
    .venv/bin/python bench/recovery.py --rows flap-20 --tokens 32k --full-problems subset \
        --results /tmp/recovery-32k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from codeprune.data.calibration import HELDOUT_FRACTION, unit_hash
from codeprune.data.instructions import build_instructions, write_jsonl
from codeprune.options import count

CLI = [sys.executable, "-m", "codeprune"]
SUBSET = ",".join(str(i) for i in range(0, 160, 4))  # 40 problems, spread over the set
ROWS = {
    "flap-20": ["--method", "flap", "--ratio", "0.2", "--structure", "adaptive"],
    "taylor-20": ["--method", "taylor", "--importance", "element1", "--ratio", "0.2"],
    "flab-22": ["--recipe", "flab", "--target", "0.22"],
}
STAGES = ("sft", "kd", "kd-pairs", "kd-distill")  # SFT on the pairs; KD on code-ppl, the pairs, distill-data


def step(name: str, out: Path, args: list[str]) -> float:
    """Run one CLI step unless its output exists (resume); its wall time (0 when reused)."""
    if out.exists():
        print(f"[{name}] reusing {out}", flush=True)
        return 0.0
    print(f"[{name}] {' '.join(args)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(CLI + args, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


# what only the recoveries and their evaluations read
RECOVERY_SETTINGS = ("tokens", "lr", "rec_seq_len", "kd_alpha")


class Results:
    """Reports of finished steps in a folder that outlives ``--work`` (committed to the repo).

    ``settings.json`` records what the reports depend on; another setting is refused, so a
    32k-token recovery is never read as a 200k-token one. The dense model's and the pruned
    models' evaluations before recovery do not depend on the recovery settings: a folder
    beside this one (``bench/results/*``) whose other settings match lends them, so a
    second learning rate does not cost the dense model's 164 problems again."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = folder, settings
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != settings:
                changed = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
                sys.exit(f"{folder} holds results made with other settings ({', '.join(changed)}): "
                         "give another --results")
        else:
            path.write_text(json.dumps(settings, indent=2) + "\n")

    def _lent(self, name: str) -> Path | None:
        """``name``.json in a sibling folder made with the same settings but for the recovery's."""
        def same(other: dict) -> bool:
            keys = {*other, *self.settings} - set(RECOVERY_SETTINGS)
            return all(other.get(k) == self.settings.get(k) for k in keys)

        for other in sorted(self.folder.parent.glob("*/settings.json")):
            report = other.parent / f"{name}.json"
            if other.parent != self.folder and report.exists() and same(json.loads(other.read_text())):
                return report
        return None

    def get(self, name: str, run: Callable[[], Path], *, recovered: bool = True) -> dict:
        """The report of step ``name``: from the folder, from a sibling (``recovered=False``:
        a step the recovery settings do not change), or ``run()`` (the step's output folder,
        which holds report.json); then kept."""
        path = self.folder / f"{name}.json"
        if path.exists():
            print(f"[{name}] result in {path}", flush=True)
            return json.loads(path.read_text())
        source = None if recovered else self._lent(name)
        if source is not None:
            print(f"[{name}] result from {source}", flush=True)
        tmp = path.with_suffix(".json.tmp")
        shutil.copyfile(source or (run() / "report.json"), tmp)  # run() only when nothing lends it
        tmp.replace(path)
        return json.loads(path.read_text())


def sft_file(path: Path, tokens: int, tokenizer) -> Path:
    """Completion-style pairs from the stdlib's calibration split, spread by hash, until they
    hold about ``tokens`` tokens (rendered with the model's chat template)."""
    if path.exists():
        return path
    from codeprune.data.prompts import encode

    records, _ = build_instructions("python-stdlib", eval_fraction=0.0, style="completion")
    records = [r for r in records if unit_hash(r["source"].rsplit(":", 1)[0]) >= HELDOUT_FRACTION
               and len(r["messages"][1]["content"]) <= 2000]
    records.sort(key=lambda r: unit_hash(r["source"]))
    chosen, total = [], 0
    for r in records:
        if total >= tokens:
            break
        enc = encode(tokenizer, r["messages"], 512)
        if enc is None:
            continue
        chosen.append({**r, "split": "train"})
        total += len(enc["input_ids"])
    held = records[len(chosen):len(chosen) + max(2, len(chosen) // 20)]
    return write_jsonl(chosen + [{**r, "split": "eval"} for r in held], path)


def epochs_for(path: Path, tokens: int, tokenizer, seq_len: int) -> str:
    """Passes over the instruction file ``path`` that train about ``tokens`` tokens (at least 1):
    a judged set is small, and every recovery gets the same budget."""
    from codeprune.data.instructions import read_instructions
    from codeprune.data.prompts import encode_all

    examples, _ = read_instructions(str(path)).split(0.0)
    encoded, _ = encode_all(tokenizer, examples, seq_len)
    per_epoch = sum(len(e["input_ids"]) for e in encoded)
    return f"{max(1.0, tokens / per_epoch):.1f}" if per_epoch else "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--work", default="runs/bench-recovery", help="outputs (reused when present)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"pruned rows: {', '.join(ROWS)}")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"recoveries to run: {', '.join(STAGES)}")
    ap.add_argument("--tokens", type=count, default=200_000, help="training tokens of each recovery")
    ap.add_argument("--lr", default="2e-4")
    ap.add_argument("--rec-seq-len", type=int, default=512)
    ap.add_argument("--kd-alpha", default=None,
                    help="the KD stages' cross-entropy share (recover --kd-alpha; default recover's 0)")
    ap.add_argument("--subset", default=SUBSET, help="HumanEval problems of the rows before / after SFT")
    ap.add_argument("--full-problems", default="all",
                    help="HumanEval problems of the dense model and after KD: all, subset, or indices")
    ap.add_argument("--before-problems", default="subset",
                    help="HumanEval problems of the pruned rows before recovery: subset, all, or indices")
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of the pruning")
    ap.add_argument("--results", default="bench/results/recovery",
                    help="reports of finished steps, kept across sessions (settings.json inside)")
    args = ap.parse_args()

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    problem_sets = {"all": "0-163", "subset": args.subset}
    full = problem_sets.get(args.full_problems, args.full_problems)
    before = problem_sets.get(args.before_problems, args.before_problems)
    rows = [r for r in args.rows.split(",") if r]
    stages = [s for s in args.stages.split(",") if s]
    unknown = [r for r in rows if r not in ROWS] + [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown rows / stages: {', '.join(unknown)}")
    settings = {k: getattr(args, k) for k in ("model", "tokens", "lr", "rec_seq_len", "ppl_windows",
                                              "ppl_seq_len", "max_new_tokens", "samples", "subset")}
    if args.kd_alpha is not None:
        settings["kd_alpha"] = args.kd_alpha
    results = Results(Path(args.results), settings)

    def evaluate(name: str, model: Callable[[], str], problems: str, extra: list[str], *,
                 recovered: bool = True) -> dict:
        # one result per problem set: a 164-problem run never reuses a 40-problem one
        tag = {args.subset: "", "0-163": "-all"}.get(problems)
        tag = "-" + hashlib.sha1(problems.encode()).hexdigest()[:8] if tag is None else tag
        out = work / f"eval-{name}{tag}"

        def run() -> Path:
            step(f"eval {name}", out, ["eval", "--model", model(), "--ppl", "code-ppl", "--windows",
                                       str(args.ppl_windows), "--seq-len", str(args.ppl_seq_len),
                                       "--humaneval", "--prompt-format", "instruct", "--problems", problems,
                                       "--max-new-tokens", str(args.max_new_tokens), "--out", str(out),
                                       *extra])
            return out
        return results.get(out.name, run, recovered=recovered)

    def sft_data() -> Path:
        from codeprune.models.loading import load_tokenizer

        return sft_file(work / "sft-completion.jsonl", args.tokens, load_tokenizer(args.model))

    def tests_data() -> Path:  # the stdlib's functions with doctests, as completion-style pairs
        out = work / "instr-tests.jsonl"
        step("instructions --with-tests", out, ["instructions", "--from", "python-stdlib", "--style",
                                                "completion", "--with-tests", "--eval-fraction", "0",
                                                "--out", str(out)])
        return out

    reports = {("dense", "before"): evaluate("dense", lambda: args.model, full, [], recovered=False)}
    recoveries: dict[tuple[str, str], dict] = {}
    common = ["--lr", args.lr, "--batch-size", "4", "--grad-accum", "1",
              "--seq-len", str(args.rec_seq_len), "--eval-data", "none"]
    for row in rows:
        pruned = work / f"pruned-{row}"

        def prune(row=row, pruned=pruned) -> str:
            step(f"prune {row}", pruned, ["prune", "--model", args.model, *ROWS[row], "--calib",
                                          "python-stdlib", "--samples", str(args.samples), "--seq-len", "128",
                                          "--eval-windows", "8", "--out", str(pruned)])
            return str(pruned)
        ppl_tok = ["--ppl-tokenizer", args.model] if row.startswith("flab") else []
        # the 164-problem evaluations after KD first: the longest, and what the targets read
        for stage in [s for s in ("kd", "kd-pairs", "kd-distill", "sft") if s in stages]:
            rec = work / f"{stage}-{row}"

            def recover(stage=stage, rec=rec, prune=prune, row=row) -> Path:
                kd, epochs = ["--teacher", args.model, "--kd"], ["--epochs", "1"]
                if args.kd_alpha is not None:
                    kd += ["--kd-alpha", args.kd_alpha]
                if stage == "sft":
                    data = ["--data", str(sft_data()), "--eval-fraction", "0"]
                elif stage == "kd":
                    data = [*kd, "--data", "code-ppl", "--tokens", str(args.tokens),
                            "--eval-fraction", "0.02"]
                elif stage == "kd-pairs":
                    data = [*kd, "--data", str(sft_data()), "--eval-fraction", "0"]
                else:  # kd-distill: Flab-Pruner's strategy, judged by the doctests
                    from codeprune.models.loading import load_tokenizer

                    judged = work / f"distill-{row}.jsonl"
                    step(f"distill-data {row}", judged, [
                        "distill-data", "--original", args.model, "--pruned", prune(), "--data",
                        str(tests_data()), "--max-new-tokens", str(args.max_new_tokens),
                        "--out", str(judged)])
                    data = [*kd, "--data", str(judged), "--eval-fraction", "0"]
                    epochs = ["--epochs", epochs_for(judged, args.tokens, load_tokenizer(args.model),
                                                     args.rec_seq_len)]
                step(rec.name, rec, ["recover", "--model", prune(), *data, "--out", str(rec), *common,
                                     *epochs])
                return rec
            recoveries[(row, stage)] = results.get(rec.name, recover)
            # a fresh --work rebuilds the recovered model when only its evaluation is missing
            reports[(row, stage)] = evaluate(f"{row}-{stage}", lambda recover=recover: str(recover()),
                                             args.subset if stage == "sft" else full, ppl_tok)
        reports[(row, "before")] = evaluate(f"{row}-before", prune, before, ppl_tok, recovered=False)
    table(args, reports, recoveries)


def table(args, reports: dict, recoveries: dict) -> None:
    rank = {name: i for i, name in enumerate(["dense", *ROWS, "before", *STAGES])}
    reports = dict(sorted(reports.items(), key=lambda kv: (rank[kv[0][0]], rank[kv[0][1]])))
    dense = reports[("dense", "before")]
    langs = list(dense["perplexity"])
    alpha = f", KD alpha {args.kd_alpha}" if args.kd_alpha is not None else ""
    print(f"\n{args.model}; recoveries: {args.tokens:,} tokens each, LoRA r 8, lr {args.lr}{alpha}, "
          f"seq {args.rec_seq_len}, 1 epoch (SFT: completion-style stdlib pairs; KD: code-ppl; "
          "KD-pairs: the SFT pairs' answers; KD-distill: distill-data on the stdlib's doctested "
          "functions, repeated to the budget; teacher = the dense model)\n")
    print("| model | stage | params | pass@1 (problems) | of dense | "
          + " | ".join(f"ppl {k.split(':')[0]}" for k in langs) + " | recovery s | tokens | tok/s |")
    print("|---|---|---|---|---|" + "---|" * len(langs) + "---|---|---|")
    for (row, st), r in reports.items():
        he, eff = r["humaneval"], r["efficiency"]
        ppl = " | ".join(f"{r['perplexity'][k]['ppl']:.3f}" for k in langs)
        rr = recoveries.get((row, st))
        timing = (f"{rr['seconds']:.0f} | {rr['tokens_seen']:,} | {rr['tokens_per_second']:.1f}" if rr
                  else "- | - | -")
        kept = _of_dense(dense["humaneval"]["per_problem"], he["per_problem"])
        print(f"| {row} | {st} | {eff['params_total']:,} | {he['pass@1']:.4f} ({he['n_problems']}) | "
              f"{kept} | {ppl} | {timing} |")
    print(f"\nThe dense model's pass@1 is on {dense['humaneval']['n_problems']} problems; 'of dense' "
          "compares each row with the dense model on the problems both ran.\n")
    for (row, st), r in reports.items():  # the target: recovery never lowers pass@1
        if st == "before":
            continue
        before, after = reports[(row, "before")]["humaneval"]["per_problem"], r["humaneval"]["per_problem"]
        common = set(before) & set(after)
        b, a = _solved(before, common), _solved(after, common)
        verdict = "LOWERED pass@1" if a < b else "kept or raised pass@1"
        print(f"- {row} {st}: {verdict} on the {len(common)} problems both ran: {b} -> {a} solved")


def _solved(per_problem: dict, tasks: set) -> int:
    """Problems among ``tasks`` solved in a report's ``per_problem`` (greedy: one sample each)."""
    return sum(per_problem[t]["correct"] for t in tasks)


def _of_dense(dense: dict, row: dict) -> str:
    """A row's solved problems as a share of the dense model's, on the problems both ran."""
    common = set(dense) & set(row)
    d = _solved(dense, common)
    return f"{_solved(row, common) / d:.0%}" if d else "-"


if __name__ == "__main__":
    main()
