"""Benchmark: language-specific Wanda sub-models (Puccioni et al.) on one model.

Prunes once per calibration language, scores every sub-model on every language,
and prints the perplexity matrix and the masks' Jaccard distances per sublayer
type. The run folder (masks, reports, heatmaps) is kept in --out.

    .venv/bin/python bench/language_sweep.py --model qwen2.5-coder-0.5b --out runs/bench-langs
"""

from __future__ import annotations

import argparse
import time

import codeprune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--langs", default="python,java,cpp,javascript")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-langs")
    args = ap.parse_args()

    start = time.perf_counter()
    res = codeprune.sweep(args.model, "wanda", sparsity=args.sparsity, calib_langs=args.langs,
                          samples=args.samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
                          efficiency=False, out=args.out, overwrite=True)
    wall = time.perf_counter() - start
    langs = list(res["eval_languages"])
    print(f"model {res['model']}, Wanda {args.sparsity:.0%}, calibration {args.samples} x {args.seq_len} "
          f"tokens per language, {args.eval_windows} held-out windows of {args.seq_len} per language")
    print(f"{'calibrated on':<16}" + "".join(f"{lang:>12}" for lang in langs))
    print(f"{'dense':<16}" + "".join(f"{res['ppl_dense'][lang]:>12.3f}" for lang in langs))
    for calib, row in res["ppl_matrix"].items():
        print(f"{calib:<16}" + "".join(f"{row[lang]:>12.3f}" for lang in langs))
    cmp = codeprune.compare([f"{res['out']}/{lang}" for lang in res["calib_languages"]])
    jac = cmp["jaccard"]
    print("mask Jaccard distance, mean over language pairs:")
    print("  " + ", ".join(f"{t} {d:.4f}" for t, d in jac["per_type_mean"].items())
          + f"; whole model {sum(p['model'] for p in jac['pairs']) / len(jac['pairs']):.4f}")
    layers = jac["per_layer_mean"]
    print(f"  per layer: first {layers[0]:.4f}, middle {layers[len(layers) // 2]:.4f}, last {layers[-1]:.4f}")
    print(f"wall time {wall:.0f} s; folder {res['out']} (heatmaps in {res['compare']})")


if __name__ == "__main__":
    main()
