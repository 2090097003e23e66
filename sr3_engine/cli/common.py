"""What every command shares: exit codes, the usage error, the device and dtype spellings."""

from __future__ import annotations

import argparse
import sys

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# The one spelling of precisions on the command line.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """The command as given cannot run at all; the message is one line; exit code 2."""


def print_error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N, or auto (cuda when available) (default {default})")


def add_dtype_argument(parser: argparse.ArgumentParser, default: str = "fp32", help: str = "model precision") -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default, help=f"{help} (default {default})")


def parse_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """`--device` as a torch.device; `auto` is cuda when available, else cpu. Under torchrun a bare
    `cuda` becomes the process's own GPU, cuda:`local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device
