"""Benchmark: batch-1 decode and prefill speed of pruned models in llama.cpp, measured in rounds.

Decode at batch 1 reads every weight once per token, so on a shared machine it varies with
everyone else's memory traffic (10-25% between back-to-back runs here). This script exports
each run of bench/deploy.py (RUNS/<name>, kept by that script) once per type, then measures
all files in turn, ``--rounds`` times (A B C A B C ...), and reports each file's median, so
that drift hits every model alike; the speed-up is against the dense file of the same type.

    .venv/bin/python bench/deploy_speed.py --runs runs/deploy --types f16,q8_0 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/deploy")
    ap.add_argument("--names", default="dense,wanda-50,flap-20-uniform,flap-20-adaptive,taylor-20,flab-22")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import codeprune
    from codeprune.evaluation.llamacpp import LlamaCpp, default_threads
    from codeprune.models.gguf_export import export_gguf, plan_export

    runs = Path(args.runs)
    names = [n for n in args.names.split(",") if (runs / n / "config.json").is_file()]
    files = {}
    for name in names:
        lm = codeprune.load(str(runs / name))
        for qtype in args.types.split(","):
            path = runs / f"speed-{name}.{qtype}.gguf"
            export_gguf(lm, path, plan=plan_export(lm, qtype), overwrite=True, progress=False)
            files[(name, qtype)] = path
        del lm
    results: dict[tuple[str, str], list[dict]] = {key: [] for key in files}
    for _ in range(args.rounds):
        for key, path in files.items():
            with LlamaCpp(path, n_ctx=256) as rt:
                results[key].append(rt.speed(prompt_len=128, new_tokens=128, repeats=2))
    print(f"llama.cpp, batch 1, {default_threads()} threads; median of {args.rounds} rounds "
          "(each the best of 2 runs of a 128-token prompt and 128 decoded tokens)\n")
    print("| model | type | prefill tok/s | decode tok/s | prefill speed-up | decode speed-up |")
    print("|---|---|--:|--:|--:|--:|")
    for (name, qtype), runs_ in results.items():
        pre = statistics.median(r["prefill_tok_s"] for r in runs_)
        dec = statistics.median(r["decode_tok_s"] for r in runs_)
        base = results[("dense", qtype)]
        pre0 = statistics.median(r["prefill_tok_s"] for r in base)
        dec0 = statistics.median(r["decode_tok_s"] for r in base)
        print(f"| {name} | {qtype} | {pre:.0f} | {dec:.1f} | {pre / pre0:.2f}x | {dec / dec0:.2f}x |")
    for path in files.values():
        path.unlink()


if __name__ == "__main__":
    main()
