"""Benchmark: how close pruning gets to the cost of reading the calibration data once.

For each model, in a fresh process each (so peak RSS is not shared):
  floor      one plain forward pass (``model(input_ids)``) over the calibration windows
  wanda      ``codeprune.prune(..., method="wanda")``: sequential calibration + masks
  sparsegpt  the same with SparseGPT (Hessians + OBS updates)
and prints wall time, ratio to the floor, peak RSS and its ratio to the model's size
in its dtype. Targets: Wanda <= 1.3x the floor, peak RSS <= 1.5x the model size.

    .venv/bin/python bench/prune_speed.py                       # smollm2-135m (+ qwen 0.5b if installed)
    .venv/bin/python bench/prune_speed.py --model qwen2.5-coder-0.5b --samples 64 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(args) -> dict:
    import torch

    import codeprune
    from codeprune.data import calibration_windows, read_source

    torch.set_grad_enabled(False)
    lm = codeprune.load(args.model)
    size_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    if args.worker == "floor":
        corpus = read_source(args.calib)
        ids = calibration_windows(lm.tokenizer, corpus, samples=args.samples,
                                  seq_len=args.seq_len, seed=0).input_ids
        start = time.perf_counter()
        for b in range(0, ids.shape[0], args.batch_size):
            lm.model(input_ids=ids[b:b + args.batch_size], use_cache=False)
        seconds = time.perf_counter() - start
    else:
        res = codeprune.prune(lm, args.worker, sparsity=0.5, calib=args.calib, samples=args.samples,
                              seq_len=args.seq_len, batch_size=args.batch_size, eval_ppl=False)
        seconds = res.report["seconds_prune"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": rss, "model_mb": size_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model(s) to measure (repeatable)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib", default="python-stdlib")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--repeat", type=int, default=1,
                    help="fresh processes per run; the fastest is reported (CPU timings are noisy)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.model = args.model[0]
        print(json.dumps(worker(args)))
        return

    from codeprune.models.offline import OFFLINE_MODELS, is_installed

    models = args.model or ["smollm2-135m"] + (
        ["qwen2.5-coder-0.5b"] if is_installed(OFFLINE_MODELS["qwen2.5-coder-0.5b"]) else [])
    print(f"calibration: {args.calib}, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"best of {args.repeat}")
    print(f"{'model':<22}{'run':<11}{'seconds':>9}{'x floor':>9}{'peak RSS MB':>13}{'x model':>9}")
    for model in models:
        floor = None
        for run in ["floor", *args.methods.split(",")]:
            cmd = [sys.executable, __file__, "--worker", run, "--model", model,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--calib", args.calib]
            tries = []
            for _ in range(args.repeat):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{model:<22}{run:<11}failed: {proc.stderr.strip().splitlines()[-1]}")
                    break
                tries.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not tries:
                continue
            r = min(tries, key=lambda t: t["seconds"])
            floor = r["seconds"] if run == "floor" else floor
            ratio = r["seconds"] / floor if floor else float("nan")
            print(f"{model:<22}{run:<11}{r['seconds']:>9.1f}{ratio:>9.2f}"
                  f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / r['model_mb']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
