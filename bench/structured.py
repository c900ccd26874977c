"""Benchmark: structured pruning (FLAP and its baselines) at 20% and 40%.

For each ratio and method (flap adaptive, flap uniform, wanda-sp, magnitude-sp),
with and without bias compensation: held-out python-stdlib perplexity, the ratio
achieved, and batch-1 decode tokens/s against the dense model's (median of
``--repeat`` runs of ``--new-tokens`` steps after a 128-token prompt). The model
is loaded once; every run prunes a fresh copy with the same calibration windows
and is scored on the same held-out windows.

Ideal decode speed-up: decoding at batch 1 is memory-bound, so the ideal is the
ratio of the bytes read per token, i.e. params_dense / params_pruned of the
whole model (embeddings included); 1 / (1 - r) is the ideal for the decoder
layers alone.

    .venv/bin/python bench/structured.py --model qwen2.5-coder-0.5b
    .venv/bin/python bench/structured.py --model smollm2-135m --ratios 0.2 --samples 32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per run, no progress bars (read when tqdm loads)

import codeprune  # noqa: E402
from codeprune.data import heldout_windows, read_source  # noqa: E402
from codeprune.evaluation.efficiency import measure_speed
from codeprune.evaluation.perplexity import perplexity  # noqa: E402
from codeprune.models.counting import count_parameters

RUNS = [("flap", "adaptive"), ("flap", "uniform"), ("wanda-sp", "uniform"), ("magnitude-sp", "uniform")]


def decode_speed(lm, repeat: int, new_tokens: int) -> float:
    return statistics.median(measure_speed(lm, batch_size=1, new_tokens=new_tokens, seed=i)["decode_tok_s"]
                             for i in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--calib", default="python-stdlib")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128, help="calibration window length (FLAP: 128)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--flap-metrics", default="wifv",
                    help="FLAP metrics to run, comma-separated (wifv = the paper's default; ifv, wifn)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    base = codeprune.load(args.model)
    corpus = read_source(args.calib)
    held = heldout_windows(base.tokenizer, corpus, seq_len=args.eval_seq_len, max_windows=args.eval_windows)
    ppl_dense = perplexity(base, held, desc="ppl dense")["ppl"]
    speed_dense = decode_speed(base, args.repeat, args.new_tokens)
    params_dense = count_parameters(base.model)[0]
    print(f"model {args.model}: {params_dense:,} parameters; calibration {args.calib} {args.samples} x "
          f"{args.seq_len}, seed 0; perplexity on {len(held.input_ids)} held-out windows of "
          f"{args.eval_seq_len}")
    print(f"dense: ppl {ppl_dense:.3f}, decode {speed_dense:.1f} tok/s (batch 1, median of {args.repeat})\n")
    header = (f"{'ratio':>5} {'method':<18}{'structure':<10}{'comp':<5}{'dec. ratio':>11}{'all ratio':>10}"
              f"{'ppl':>10}{'decode tok/s':>13}{'speed-up':>9}{'ideal':>7}{'of ideal':>9}{'prune s':>8}")
    print(header)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        runs = [(m, s, {"metric": metric} if m == "flap" else {}) for m, s in RUNS
                for metric in (args.flap_metrics.split(",") if m == "flap" else [None])]
        for method, structure, options in runs:
            label = f"{method} {options['metric']}" if options else method
            for comp in (True, False):
                lm = copy.deepcopy(base)
                start = time.perf_counter()
                res = codeprune.prune(lm, method, ratio=ratio, structure=structure, compensation=comp,
                                      calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                                      eval_ppl=False, efficiency=False, **options)
                seconds = time.perf_counter() - start
                r = res.report
                ppl = perplexity(lm, held, desc="ppl")["ppl"]
                speed = decode_speed(lm, args.repeat, args.new_tokens)
                ideal = params_dense / r["params_total"]
                row = {"ratio": ratio, "method": label, "structure": structure, "compensation": comp,
                       "ratio_actual_decoder": r["ratio_actual_decoder"],
                       "ratio_actual_total": r["ratio_actual_total"], "ppl": ppl, "ppl_dense": ppl_dense,
                       "decode_tok_s": speed, "decode_tok_s_dense": speed_dense,
                       "speedup": speed / speed_dense, "ideal_speedup": ideal,
                       "ideal_speedup_decoder": 1 / (1 - ratio), "seconds": seconds,
                       "heads_per_layer": r["heads_per_layer"], "ffn_per_layer": r["ffn_per_layer"]}
                rows.append(row)
                print(f"{ratio:>5.2f} {label:<18}{structure:<10}{'yes' if comp else 'no':<5}"
                      f"{row['ratio_actual_decoder']:>11.4f}{row['ratio_actual_total']:>10.4f}{ppl:>10.4g}"
                      f"{speed:>13.1f}{row['speedup']:>8.2f}x{ideal:>6.2f}x{row['speedup'] / ideal:>9.0%}"
                      f"{seconds:>8.0f}", flush=True)
                del lm, res
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "ppl_dense": ppl_dense, "decode_tok_s_dense": speed_dense,
                       "params_dense": params_dense, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
