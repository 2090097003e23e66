"""What every command shares: exit codes, the usage error, signals, the device, dtype and
size spellings."""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import threading
from fractions import Fraction
from typing import Callable

import torch

from ..io import one_line, printable
from ..runtime.backends import BackendUnavailableError
from ..runtime.engine import AUTO, PRECISION_CHOICES, PRECISIONS, SR3Engine, auto_device, precision_name
from ..samplers import SAMPLERS, SamplerConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# What a shell reports for a process that a signal ended: 128 + the signal's number.
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM
SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# Appended to the engine's MemoryBudgetError message.
TILE_HINT = "try --tile N with a smaller N, or a larger --max-memory"


class UsageError(Exception):
    """The command as given cannot run at all; the message is one line; exit code 2."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT (and, like it,
    not an Exception, so no `except Exception` swallows it)."""


def print_error(message: str) -> None:
    print(f"error: {printable(' '.join(message.split()))}", file=sys.stderr)


def run_until_stopped(command: Callable[[], int]) -> int:
    """`command()`'s exit code. Ctrl-C (SIGINT) and SIGTERM stop it by raising in the main
    thread, so that `finally` blocks and `io.atomic_path` clean up (no temporary file is
    left) as they do for any error; the command then ends with one line and exit code 130 or
    143 rather than a traceback. A SIGTERM disposition other than the default (ignored, or a
    caller's own handler) is left alone, as is everything outside the main thread."""
    owned = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if owned:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return command()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if owned:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def loaded_engine(load: Callable[[], SR3Engine], *, model: str, backend: str) -> SR3Engine:
    """The engine `load()` makes; whatever stops the model from loading, as a one-line UsageError."""
    try:
        return load()
    except BackendUnavailableError as error:
        raise UsageError(f"--backend {backend}: {error}") from None
    except (OSError, ValueError) as error:
        raise UsageError(one_line(error)) from None
    # Weights that do not fit config.json are refused (ValueError) before any network is built;
    # a network as large as its weights file can still be larger than memory, and fail while it
    # is built or moved to the device.
    except (RuntimeError, TypeError, MemoryError) as error:
        raise UsageError(f"{model}: cannot load the model ({one_line(error)})") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text}")
    return value


def tile_pixels(input_pixels: int, scale: int) -> int | None:
    """--tile and --tile-overlap count input pixels, 0 meaning automatic; the engine counts
    output pixels, None meaning automatic."""
    return input_pixels * scale if input_pixels else None


def byte_size(text: str) -> int:
    """A memory size in bytes: a plain number of bytes or a number with K, M, G or T
    (powers of 1024; a trailing B or iB is allowed), e.g. 2G, 1500M, 0.5G, 512K."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes or a size such as 2G, 1500M, 512K; got {text!r}")
    value = int(Fraction(match[1]) * SIZE_UNITS[match[2].upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte; got {text!r}")
    return value


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """--tile, --tile-overlap (input pixels; see `tile_pixels`) and --max-memory (see `byte_size`)."""
    parser.add_argument("--tile", type=non_negative_int, default=0, metavar="N",
                        help="sample in tiles of N x N input pixels (default 0: automatic, as memory requires)")
    parser.add_argument("--tile-overlap", type=non_negative_int, default=0, metavar="N",
                        help="overlap of neighbouring tiles in input pixels (default 0: automatic)")
    parser.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                        help="denoiser working memory allowed, e.g. 2G, 1500M, 512K or bytes "
                        "(default: a share of the free memory)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler and --strength, which override the model's own sampler (`sampler_config`)."""
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="default: the model's sampler")
    parser.add_argument("--strength", type=float, help="fraction of the schedule run from the diffused input "
                        "(1 = from pure noise); default: the model's")


def sampler_config(engine: SR3Engine, args: argparse.Namespace) -> SamplerConfig:
    """The model's sampler with --sampler and --strength applied."""
    try:
        return engine.sampler_config(args.sampler, strength=args.strength)
    except ValueError as error:
        raise UsageError(f"--strength: {error}") from None


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N, or auto (cuda when available) (default {default})")


def add_dtype_argument(parser: argparse.ArgumentParser, default: str = AUTO, help: str = "model precision") -> None:
    """--dtype: fp32, fp16, bf16, or auto (bf16 where the device and backend compute it natively, else
    fp32) unless the default is one of the three, as for a file's precision."""
    choices = PRECISION_CHOICES if default == AUTO else tuple(PRECISIONS)
    auto = ", auto: bf16 where the device and backend compute it natively, else fp32" if default == AUTO else ""
    parser.add_argument("--dtype", choices=choices, default=default, help=f"{help} (default {default}{auto})")


def engine_line(model: str, engine: SR3Engine) -> str:
    """What a command says first about the engine it loaded: model, backend, device and precision, and why."""
    return printable(f"{model}: {engine.backend.name} backend on {engine.device}, "
                     f"{precision_name(engine.dtype)} ({engine.dtype_reason})")


def parse_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """`--device` as a torch.device; `auto` is cuda when available, else cpu. Under torchrun a bare
    `cuda` becomes the process's own GPU, cuda:`local_rank`."""
    if name == "auto":
        name = auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device
