"""The Python API: every command of the CLI, with the same names and options.

    import codeprune
    lm = codeprune.load("smollm2-135m")
    result = codeprune.prune(lm, "wanda", sparsity=0.5, calib="python-stdlib",
                             samples=64, seq_len=512, out="runs/wanda50")
    print(result.report["ppl_dense"], result.report["ppl_pruned"])
    codeprune.evaluate("runs/wanda50", ppl=["code-ppl"], humaneval=True, out="runs/wanda50-eval")
    codeprune.sweep("smollm2-135m", "wanda", calib_langs="python,java", out="runs/langs")
    codeprune.compare(["runs/langs/python", "runs/langs/java"], out="runs/langs/compare")
    codeprune.report(["runs/wanda50", "runs/langs/python"], out="runs/report")
    codeprune.instructions("python:src/", out="data/instr.jsonl")
    codeprune.recover("runs/wanda50", "data/instr.jsonl", out="runs/wanda50-rec", epochs=1)
    codeprune.recover("runs/wanda50", "code-ppl", out="runs/wanda50-kd", teacher="smollm2-135m", kd=True,
                      tokens=200_000)
    codeprune.prune("qwen2.5-coder-0.5b", recipe="flab", target=0.22, out="runs/q-flab-22")
    codeprune.distill_data("qwen2.5-coder-0.5b", "runs/q-flab-22", "data/instr.jsonl",
                           out="data/instr-flab.jsonl")
    codeprune.export("runs/q-flab-22", "runs/q-flab-22.q8_0.gguf", gguf_type="q8_0")
    codeprune.evaluate("runs/q-flab-22.q8_0.gguf", runtime="llama.cpp")

This module is a facade: each function lives in ``codeprune.workflows`` (one
module per command) or ``codeprune.reporting`` (views over many runs); the CLI
(``codeprune.cli``) parses arguments, calls these, and prints.
"""

from __future__ import annotations

from codeprune.reporting.analysis import compare_runs as compare
from codeprune.reporting.analysis import report_runs as report
from codeprune.workflows.common import load
from codeprune.workflows.distill import distill_data
from codeprune.workflows.evaluate import evaluate
from codeprune.workflows.export import ExportResult, export
from codeprune.workflows.instructions import instructions
from codeprune.workflows.prune import PruneResult, prune
from codeprune.workflows.recover import RecoverResult, recover
from codeprune.workflows.sweep import sweep

__all__ = ["ExportResult", "PruneResult", "RecoverResult", "compare", "distill_data", "evaluate", "export",
           "instructions", "load",
           "prune", "recover", "report", "sweep"]

