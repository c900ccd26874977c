"""Benchmark: held-out perplexity of each method and pattern on one model.

Every run uses the same calibration (python-stdlib, seed 0) and the same
held-out windows, so the numbers compare like with like.

    .venv/bin/python bench/method_quality.py                              # smollm2-135m
    .venv/bin/python bench/method_quality.py --model qwen2.5-coder-0.5b --samples 64 --seq-len 512
"""

from __future__ import annotations

import argparse

import codeprune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="python-stdlib")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    args = ap.parse_args()

    print(f"model {args.model}; calibration {args.calib}, {args.samples} x {args.seq_len} tokens, "
          f"seed 0; perplexity on {args.eval_windows} held-out windows of {args.seq_len}")
    print(f"{'method':<11}{'pattern':<14}{'sparsity':>9}{'ppl':>10}{'prune s':>9}")
    dense_printed = False
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            res = codeprune.prune(args.model, method, sparsity=0.5, pattern=pattern, calib=args.calib,
                                  samples=args.samples, seq_len=args.seq_len,
                                  eval_windows=args.eval_windows)
            r = res.report
            if not dense_printed:
                print(f"{'dense':<11}{'-':<14}{0.0:>9.3f}{r['ppl_dense']:>10.3f}{'-':>9}")
                dense_printed = True
            print(f"{method:<11}{pattern:<14}{r['sparsity_actual']:>9.3f}{r['ppl_pruned']:>10.3f}"
                  f"{r['seconds_prune']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
