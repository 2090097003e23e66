"""`python -m sr3_engine <command>`: the command-line entry point.

Each command lives in its own module and registers its subparser here, so this file
only dispatches. `main(argv)` returns the exit code instead of exiting, so tests and
other programs can call it in-process; argparse's own usage errors come back as 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import cli_upscale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine",
                                     description="SR3 image super-resolution engine.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_upscale.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else cli_upscale.EXIT_USAGE
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
