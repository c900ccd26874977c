"""Benchmark: distillation's cost, as training tokens/s against a plain LoRA step.

Runs ``codeprune recover`` on the same code windows (python-stdlib) three ways,
each in its own process: cross-entropy (the plain LoRA step), KD with the teacher
in float32, KD with the teacher in bfloat16 (``--teacher-dtype``); the student is
FLAP 20% uniform of ``--model``, the teacher ``--model`` itself. Prints the
training tokens/s of each (report.json ``tokens_per_second``: the Trainer's
training loop only, without loading or evaluation) and KD's share of the plain
step's throughput.

    .venv/bin/python bench/kd_throughput.py                          # smollm2-135m, a few minutes
    .venv/bin/python bench/kd_throughput.py --model qwen2.5-coder-0.5b --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [sys.executable, "-m", "codeprune"]


def run(args: list[str]) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(CLI + args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        student = work / "student"
        if not student.exists():
            run(["prune", "--model", args.model, "--method", "flap", "--ratio", "0.2", "--structure",
                 "uniform", "--samples", "16", "--seq-len", "128", "--eval-windows", "2",
                 "--out", str(student)])
        tokens = args.steps * args.batch_size * args.seq_len
        common = ["--data", "python-stdlib", "--tokens", str(tokens), "--seq-len", str(args.seq_len),
                  "--batch-size", str(args.batch_size), "--grad-accum", "1", "--epochs", "1",
                  "--eval-fraction", "0", "--eval-data", "none", "--device", "cpu"]
        variants = {"LoRA, cross-entropy": [],
                    "LoRA, KD (teacher float32)": ["--teacher", args.model, "--kd",
                                                   "--teacher-dtype", "float32"],
                    "LoRA, KD (teacher bfloat16)": ["--teacher", args.model, "--kd",
                                                    "--teacher-dtype", "bfloat16"]}
        rows = {}
        for name, extra in variants.items():
            out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            if not out.exists():
                run(["recover", "--model", str(student), *common, *extra, "--out", str(out)])
            rows[name] = json.loads((out / "report.json").read_text())
    base = rows["LoRA, cross-entropy"]["tokens_per_second"]
    print(f"\n{args.model} FLAP 20% uniform, {args.steps} steps of {args.batch_size} x {args.seq_len} "
          f"tokens, {os.cpu_count()} cores\n")
    print("| recovery | tokens/s | of the plain LoRA step |")
    print("|---|--:|--:|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base:.0%} |")


if __name__ == "__main__":
    main()
