"""Benchmark: HumanEval pass@1 (greedy) of one model, with the wall time it took.

    .venv/bin/python bench/humaneval.py --model qwen2.5-coder-0.5b --prompt-format instruct
    .venv/bin/python bench/humaneval.py --model runs/q-wanda --limit 40

Generation runs in this process (transformers), each completion in the sandbox.
"""

from __future__ import annotations

import argparse
import time

import codeprune
from codeprune.evaluation.humaneval import HumanEvalConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-format", default="base", choices=["base", "instruct"])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="keep report.json and the samples here")
    args = ap.parse_args()

    cfg = HumanEvalConfig(prompt_format=args.prompt_format, limit=args.limit,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    start = time.perf_counter()
    res = codeprune.evaluate(args.model, humaneval=cfg, efficiency=False, device=args.device,
                             out=args.out, overwrite=True)
    wall = time.perf_counter() - start
    he = res["humaneval"]
    print(f"model {res['model']}: HumanEval pass@1 {he['pass@1']:.4f} ({he['statuses']['passed']}/"
          f"{he['n_problems']}), greedy, prompt format {args.prompt_format}, max {args.max_new_tokens} "
          f"new tokens, batch {args.batch_size}, device {args.device}")
    print(f"statuses {he['statuses']}; wall time {wall:.0f} s (load, generation and sandboxed execution)")


if __name__ == "__main__":
    main()
