"""The `esparse` command: a small dispatcher over subcommands that live in their own modules.

Each subcommand module provides `configure_parser(parser)` and `run_cli(args) -> int` (or names
other functions below). Add a subcommand with one line in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .errors import EsparseError

# name: (module, help, configure function, run function)
SUBCOMMANDS = {
    "report": ("esparse.report", "render the HTML and Markdown report of a results directory and write its manifest",
               "configure_parser", "run_cli"),
    "audit": ("esparse.audit", "re-verify a results directory: checksums, manifest, re-runs, a reference run",
              "configure_parser", "run_cli"),
    "prune-scale": ("esparse.scale", "prune the first blocks of a LLaMA-shaped random model across devices; "
                    "record memory per device", "configure_parser", "run_cli"),
    "prune-bench": ("esparse.prune_bench", "time E-Sparse against Wanda pruning, pairs alternating in one process",
                    "configure_parser", "run_cli"),
    "reference": ("esparse.audit", "export a run's tables and provenance as a reference for `audit --against`",
                  "configure_reference_parser", "run_reference_cli"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esparse", description="esparse-bench command line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, configure, run) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, configure)(sub)
        sub.set_defaults(_run=getattr(module, run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except EsparseError as error:
        print(f"esparse {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
