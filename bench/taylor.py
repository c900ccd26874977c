"""Benchmark: LLM-Pruner's Taylor importances at 20%, before and after a short LoRA recovery.

For each importance (element1, element2, vector, l2, random): prune a fresh copy
of the model (uniform, layer scope 0.1:0.9, the paper's setting), score held-out
python-stdlib perplexity (windows of ``--seq-len`` tokens, LLM-Pruner's protocol
uses 128), then run the same short recovery for every model (same instruction
data, steps, seed) and score again. Also: the time of the gradient pass and the
peak extra memory it took (RSS sampled every 20 ms on the CPU, max allocated on
CUDA), against the estimate in docs/taylor.md. For memory figures run one
importance per process with ``--no-recover``: the heap of earlier runs hides
later allocations from RSS.

Recovery data: instruction pairs built from the standard library's documented
functions (``codeprune instructions``), keeping only files of the calibration
split, so the held-out perplexity files never feed training.

    .venv/bin/python bench/taylor.py --model qwen2.5-coder-0.5b
    .venv/bin/python bench/taylor.py --model smollm2-135m --importances element1,random --rec-steps 5
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per run, no progress bars (read when tqdm loads)

import psutil  # noqa: E402

import codeprune  # noqa: E402
from codeprune.calibration.gradients import prunable_parameters
from codeprune.data.calibration import HELDOUT_FRACTION, unit_hash  # noqa: E402
from codeprune.data.instructions import build_instructions, write_jsonl  # noqa: E402
from codeprune.methods.structured import prune as structured_driver  # noqa: E402  (runs the pass)
from codeprune.methods.structured.base import scope_layers
from codeprune.workflows.recover import RecoverConfig, recover


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        try:  # give freed heap back to the OS first, or the pass reuses it unseen
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--importances", default="element1,element2,vector,l2,random")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples for the gradients")
    ap.add_argument("--seq-len", type=int, default=128, help="calibration and evaluation window length")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--rec-steps", type=int, default=10, help="recovery optimizer steps")
    ap.add_argument("--rec-batch", type=int, default=4)
    ap.add_argument("--rec-seq-len", type=int, default=256)
    ap.add_argument("--rec-lr", type=float, default=2e-4)
    ap.add_argument("--no-recover", action="store_true", help="prune and time only (no recovery)")
    ap.add_argument("--no-checkpointing", action="store_true", help="gradient pass without checkpointing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-taylor-"))
    records, _ = build_instructions("python-stdlib", eval_fraction=0.02)
    records = [r for r in records if unit_hash(r["source"].rsplit(":", 1)[0]) >= HELDOUT_FRACTION]
    data = write_jsonl(records, work / "instr.jsonl")
    print(f"recovery data: {len(records)} pairs from the stdlib's calibration split")

    measured: dict = {}
    real_pass = structured_driver.gradient_pass

    def measured_pass(*a, **kw):
        with PeakRSS() as mem:
            out = real_pass(*a, **kw)
        measured.update(rss_extra_mb=mem.extra_mb, cuda_peak_mb=out.peak_memory_mb)
        return out

    structured_driver.gradient_pass = measured_pass
    base = codeprune.load(args.model)
    rows = []
    for imp in args.importances.split(","):
        measured.clear()
        lm = copy.deepcopy(base)
        start = time.perf_counter()
        res = codeprune.prune(lm, "taylor", importance=imp, ratio=args.ratio, calib="python-stdlib",
                              checkpointing=not args.no_checkpointing,
                              samples=args.samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
                              efficiency=False, device=args.device, out=work / f"pruned-{imp}")
        seconds = time.perf_counter() - start
        r = res.report
        del lm, res
        rec = None
        if not args.no_recover:
            config = RecoverConfig(max_steps=args.rec_steps, batch_size=args.rec_batch, grad_accum=1,
                                   seq_len=args.rec_seq_len, lr=args.rec_lr, eval_fraction=0.02,
                                   eval_steps=args.rec_steps)
            rec = recover(str(work / f"pruned-{imp}"), str(data), out=work / f"rec-{imp}", device=args.device,
                          config=config, eval_ppl="python-stdlib", eval_windows=args.eval_windows,
                          ppl_seq_len=args.seq_len)
        grad = r.get("gradient_pass") or {}
        rr = rec.report if rec is not None else dict.fromkeys(
            ["ppl_after", "ppl_before", "eval_loss_before", "eval_loss_after", "seconds"])
        row = {"importance": imp, "ppl_dense": r["ppl_dense"], "ppl_pruned": r["ppl_pruned"],
               "ppl_recovered": rr["ppl_after"], "ppl_before_recovery_check": rr["ppl_before"],
               "eval_loss_before": rr["eval_loss_before"], "eval_loss_after": rr["eval_loss_after"],
               "ratio_total": r["ratio_actual_total"], "params": r["params_total"],
               "grad_seconds": grad.get("seconds"), "prune_seconds": seconds,
               "grad_rss_extra_mb": measured.get("rss_extra_mb"),
               "grad_cuda_peak_mb": measured.get("cuda_peak_mb"), "recover_seconds": rr["seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    prunable = sum(p.numel() for p in prunable_parameters(
        base, scope_layers((0.1, 0.9), base.adapter.num_layers)).values())
    print(f"\n{args.model}: ratio {args.ratio} of decoder parameters, {args.samples} x {args.seq_len} "
          f"calibration, ppl on {args.eval_windows} x {args.seq_len} held-out windows; recovery "
          f"{args.rec_steps} steps x {args.rec_batch} examples x {args.rec_seq_len} tokens, lr {args.rec_lr}")
    print(f"prunable parameters in scope: {prunable / 1e6:.1f} M -> float32 sums "
          f"{prunable * 4 / 2**20:.0f} MiB (element2: x2)\n")
    print("| importance | ppl dense | ppl pruned | ppl after recovery | gradient pass (s) "
          "| extra RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = "-" if r["grad_seconds"] is None else f"{r['grad_seconds']:.1f}"
        m = "-" if r["grad_rss_extra_mb"] is None else f"{r['grad_rss_extra_mb']:.0f}"
        rec = "-" if r["ppl_recovered"] is None else f"{r['ppl_recovered']:.3f}"
        print(f"| {r['importance']} | {r['ppl_dense']:.3f} | {r['ppl_pruned']:.3f} | {rec} | {g} | {m} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
