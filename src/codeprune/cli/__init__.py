"""The ``codeprune`` command: argument parsing and printing around ``codeprune.api``.

    codeprune --version
    codeprune models [--install NAME | --verify [ALIAS...] | --rebuild ALIAS] [--json]
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

Errors caused by input print one line on stderr and exit with code 2; so does an
output that cannot be written (no space, read-only, no permission). SIGINT,
SIGTERM and SIGHUP unwind the run (every temporary folder is removed on the way)
and exit 130, 143 and 129: "codeprune: interrupted" / "codeprune: terminated".
"""

from __future__ import annotations

import errno
import signal
import sys

from codeprune.cli.commands import HANDLERS
from codeprune.cli.parser import build_parser, chosen_command
from codeprune.errors import CodepruneError, Terminated

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    record_command(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    previous = _terminate_on_signals()
    try:
        return HANDLERS[args.command](args)
    except CodepruneError as e:
        print(f"codeprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_FAULTS:  # a bug or an unexpected failure: keep its traceback
            raise
        where = f" {e.filename}" if e.filename else ""
        what = "cannot access" if e.errno == errno.EACCES else "cannot write"  # EACCES: a read too
        print(f"codeprune: error: {what}{where}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codeprune: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print("codeprune: terminated", file=sys.stderr)
        return 128 + e.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# faults of the machine, not of codeprune, met outside an atomic write (caches, training checkpoints)
_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _raise_terminated(signum, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # one unwinding at a time: a second signal waits for it
    raise Terminated(signum)


def _terminate_on_signals() -> dict:
    """SIGTERM and SIGHUP raise ``Terminated`` in the main thread, as SIGINT raises
    KeyboardInterrupt, so ``finally`` blocks remove temporary folders on the way out. A
    signal ignored when codeprune started (``nohup`` ignores SIGHUP) stays ignored."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        try:
            previous[signum] = signal.signal(signum, _raise_terminated)
        except ValueError:  # not the main thread (main() called from a thread): leave them
            pass
    return previous


def record_command(argv: list[str]) -> None:
    """Remember the command line for the reports this run writes (report.json's provenance).

    reporting/provenance.py is torch-free, so this costs ``--help`` nothing."""
    from codeprune.reporting.provenance import set_command

    set_command(argv)
