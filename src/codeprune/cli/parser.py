"""The argument parser of ``codeprune``, built lazily: ``codeprune --help`` imports no torch.

    build_parser()            # the command list only (what ``codeprune --help`` shows)
    build_parser("prune")     # plus every argument of ``prune`` (imports the methods, so torch)
    build_parser(full=True)   # every command's arguments (the tests)

The subcommands' arguments are in cli/subcommands.py, the shared and generated ones
in cli/arguments.py.
"""

from __future__ import annotations

import argparse

from codeprune.cli.subcommands import COMMANDS
from codeprune.version import __version__


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 like every other error."""

    def error(self, message: str):
        self.exit(2, f"codeprune: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None, *, full: bool = False) -> Parser:
    """The parser with every subcommand listed; only ``command``'s arguments (all with ``full``)
    are built, since building some imports torch."""
    parser = Parser(prog="codeprune", description="Prune code LLMs and measure the cost.",
                    epilog="Run `codeprune COMMAND --help` for a command's options and examples. Errors "
                           "caused by input print one line on stderr and exit with code 2.")
    parser.add_argument("--version", action="version", version=f"codeprune {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".",
                           epilog="examples:\n" + "\n".join(f"  {line}" for line in cmd.examples),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if full or name == command:
            cmd.build(p)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word; the top-level flags take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)
