"""The ``codeprune`` command: argument parsing and printing around ``codeprune.api``.

    codeprune --version
    codeprune models [--install NAME] [--json]
    codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50
    codeprune prune --model smollm2-135m --method flap --ratio 0.2 --out runs/flap20
    codeprune prune --model smollm2-135m --method taylor --importance element1 --ratio 0.2 --out runs/t20
    codeprune prune --model qwen2.5-coder-0.5b --recipe flab --target 0.22 --out runs/q-flab-22
    codeprune instructions --from python:src/ --out data/instr.jsonl
    codeprune recover --model runs/t20 --data data/instr.jsonl --out runs/t20-rec
    codeprune distill-data --original qwen2.5-coder-0.5b --pruned runs/q-flab-22 --data data/instr.jsonl \
        --out data/instr-flab.jsonl
    codeprune eval --model runs/wanda50 --ppl code-ppl --humaneval --out runs/wanda50-eval
    codeprune sweep --model smollm2-135m --calib-langs python,java --out runs/langs
    codeprune compare runs/langs/*
    codeprune report runs/*

- parser.py: the lazily built parser (``codeprune --help`` imports no torch);
- arguments.py: shared flags, and the flags generated from config dataclasses
  (codeprune/options.py);
- subcommands.py: each subcommand's own arguments and examples;
- commands.py: what each subcommand calls (``codeprune.api``; ``models`` lists the
  offline aliases, ``compare`` / ``report`` the views of reporting/analysis.py) and prints.

Errors caused by input print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import sys

from codeprune.cli.commands import HANDLERS
from codeprune.cli.parser import build_parser, chosen_command
from codeprune.errors import CodepruneError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    record_command(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except CodepruneError as e:
        print(f"codeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codeprune: interrupted", file=sys.stderr)
        return 130


def record_command(argv: list[str]) -> None:
    """Remember the command line for the reports this run writes (report.json's provenance).

    reporting/provenance.py is torch-free, so this costs ``--help`` nothing."""
    from codeprune.reporting.provenance import set_command

    set_command(argv)
