"""`python -m sr3_engine <command>`: one command line for everything the package does.

Each command is a module here with `main(argv) -> int` (0 ok, 1 some inputs failed, 2 the
command cannot run as given) and a one-line docstring that `--help` lists. The module entry
points (`python -m sr3_engine.train`, `.evaluate`, `.export`, `.demo`) call the same `main`.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Sequence

from . import convert, demo, distill, evaluate, export, serve, train, upscale
from .common import EXIT_USAGE

COMMANDS: dict[str, ModuleType] = {"upscale": upscale, "train": train, "distill": distill, "evaluate": evaluate,
                                   "export": export, "convert": convert, "demo": demo, "serve": serve}


def _summary(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {_summary(module)}" for name, module in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m sr3_engine", description="SR3 image super-resolution engine.",
        epilog=f"commands:\n{listing}\n\n`python -m sr3_engine COMMAND --help` describes one.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=tuple(COMMANDS), metavar="COMMAND",
                        help=f"one of: {', '.join(COMMANDS)}")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit code (argparse's usage errors come back as 2)."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command].main(args.arguments)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
