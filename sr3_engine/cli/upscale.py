"""Super-resolve image files and folders to PNGs.

    python -m sr3_engine upscale IN... -o OUTDIR --model DIR

Built for unattended runs over folders of user images: a bad input costs one line on
stderr (`error: <path>: <reason>`) and never the run, every output is written to a
temporary name and renamed so a killed run leaves no half-written PNG, and the exit
code tells a script what happened: 0 all written, 1 some inputs failed, 2 the command
itself is unusable (bad flags, no inputs, a model that cannot be loaded).

Each input becomes `OUTDIR/<stem>.png`; inputs sharing a stem get `<stem>-2.png`, ... in
input order, decided over the whole input list so that ranks never collide.

Images are read twice: once up front, so that every bad file is reported before hours
of sampling, and again batch by batch, so memory holds one batch rather than the folder.
Images of equal size and mode are sampled together, up to --batch-size.

Seeds: each batch gets its own CPU generator, seeded from --seed and the output name of
the batch's first image. With --batch-size 1 an image's output therefore depends only on
--seed, its name, the model and the sampling flags: not on which other images are in the
folder, nor on how many ranks share the work. With larger batches it also depends on
which images were batched with it. The generator lives on the CPU so the same seed gives
the same noise on every device.

With --distributed (under torchrun) rank r processes inputs[r::world_size] of the sorted
input list and writes its own outputs; the counts are summed across ranks, rank 0 prints
the summary, and every rank exits 1 if any rank had a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io import DEFAULT_MAX_PIXELS, ImageError, collect_inputs, load_image, one_line, output_names, save_png
from ..runtime.backends import ENGINE_BACKENDS, BackendUnavailableError
from ..runtime.engine import SR3Engine
from ..samplers import SAMPLERS, SamplerConfig
from .common import (DTYPES, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, add_device_argument, add_dtype_argument,
                     parse_device, positive_int, print_error)


class Job(NamedTuple):
    source: Path
    output: Path


Fail = Callable[[Job, str], None]
Groups = dict[tuple[tuple[int, int], str], list[Job]]


@dataclasses.dataclass
class Tally:
    written: int = 0
    failed: int = 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine upscale",
                                     description="Super-resolve images with an SR3 model; one PNG per input.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files and folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument("--model", required=True, help="model directory or bundled model name")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's schedule)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="default: the model's sampler")
    parser.add_argument("--strength", type=float, help="fraction of the schedule run from the diffused input "
                        "(1 = from pure noise); default: the model's")
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="eager", help="engine backend")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images of one size sampled together")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (see the module docs)")
    add_device_argument(parser, default="cpu")
    add_dtype_argument(parser)
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject inputs with more pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true", help="shard inputs over torchrun processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = parse_device(args.device)
        with process_group(args.distributed, device) as (rank, world_size, local_rank):
            return upscale_all(args, _local_device(device, local_rank, args.distributed), rank, world_size)
    except UsageError as error:
        print_error(str(error))
        return EXIT_USAGE


def _local_device(device: torch.device, local_rank: int, distributed: bool) -> torch.device:
    # One GPU per torchrun process unless the user pinned an index.
    if distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def process_group(distributed: bool, device: torch.device) -> Iterator[tuple[int, int, int]]:
    """(rank, world_size, local_rank); a torch.distributed group for the duration if asked."""
    if not distributed:
        yield 0, 1, 0
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("--distributed: this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"--distributed: run under torchrun (environment lacks {', '.join(missing)})")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(_local_device(device, local_rank, True))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), local_rank
    finally:
        dist.destroy_process_group()


def upscale_all(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> int:
    jobs = plan_jobs(args.inputs, args.output)[rank::world_size]
    show_progress = not args.no_progress and rank == 0 and sys.stderr.isatty()
    engine = load_engine(args, device, show_progress)
    sampler = sampler_config(engine, args)
    make_output_folder(args.output)
    announce_renames(jobs)
    tally = Tally()
    with tqdm(total=len(jobs), desc="upscaling", unit="image", disable=not show_progress) as bar:
        def fail(job: Job, reason: str) -> None:
            tqdm.write(f"error: {ImageError(job.source, reason)}", file=sys.stderr)
            tally.failed += 1
            bar.update(1)

        for batch in batches(validate(jobs, args.max_pixels, fail), args.batch_size):
            written = upscale_batch(engine, sampler, batch, args, fail)
            tally.written += written
            bar.update(written)
    written, failed = sum_across_ranks(tally, device, args.distributed)
    if rank == 0:
        print(f"{written} written to {args.output}, {failed} failed")
    return EXIT_FAILED if failed else EXIT_OK


def plan_jobs(inputs: list[str], outdir: Path) -> list[Job]:
    # Outputs of an earlier run inside an input folder are not inputs of this one.
    try:
        sources = collect_inputs(inputs, exclude=[outdir])
    except ImageError as error:
        raise UsageError(str(error)) from None
    if not sources:
        raise UsageError(f"no images found in {' '.join(inputs)} (extensions: png jpg jpeg webp tif tiff bmp)")
    return [Job(source, outdir / name) for source, name in zip(sources, output_names(sources))]


def make_output_folder(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{outdir}: cannot create the output folder ({error.strerror or error})") from None


def announce_renames(jobs: list[Job]) -> None:
    for job in jobs:
        if job.output.stem != job.source.stem:
            print(f"note: {job.source} is written as {job.output} (another input has the stem "
                  f"{job.source.stem!r})", file=sys.stderr)


def load_engine(args: argparse.Namespace, device: torch.device, show_progress: bool) -> SR3Engine:
    try:
        engine = SR3Engine.from_pretrained(args.model, backend=args.backend, device=device,
                                           dtype=DTYPES[args.dtype], progress=show_progress)
    except BackendUnavailableError as error:
        raise UsageError(f"--backend {args.backend}: {error}") from None
    except (OSError, ValueError) as error:
        raise UsageError(one_line(error)) from None
    # load_state_dict reports weights that do not fit the config as a multi-line RuntimeError.
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"{args.model}: cannot load the model ({one_line(error)})") from None
    if args.steps is not None:
        try:
            engine.schedule_for(args.steps)
        except ValueError as error:
            raise UsageError(f"--steps {args.steps}: {error}") from None
    return engine


def sampler_config(engine: SR3Engine, args: argparse.Namespace) -> SamplerConfig:
    """The model's sampler with --sampler and --strength applied."""
    try:
        return engine.sampler_config(args.sampler, strength=args.strength)
    except ValueError as error:
        raise UsageError(f"--strength: {error}") from None


def validate(jobs: list[Job], max_pixels: int, fail: Fail) -> Groups:
    """Decode every input once, reporting the bad ones; the good ones grouped by
    (size, mode) in order of first appearance."""
    groups: Groups = {}
    for job in jobs:
        try:
            image = load_image(job.source, max_pixels)
        except ImageError as error:
            fail(job, error.reason)
            continue
        groups.setdefault((image.size, image.mode), []).append(job)
    return groups


def batches(groups: Groups, batch_size: int) -> Iterator[list[Job]]:
    for jobs in groups.values():
        for start in range(0, len(jobs), batch_size):
            yield jobs[start:start + batch_size]


def upscale_batch(engine: SR3Engine, sampler: SamplerConfig, batch: list[Job], args: argparse.Namespace,
                  fail: Fail) -> int:
    """Sample one batch and write its PNGs; returns how many were written."""
    loaded: list[tuple[Job, Image.Image]] = []
    for job in batch:
        try:
            loaded.append((job, load_image(job.source, args.max_pixels)))
        except ImageError as error:
            fail(job, error.reason)
    if not loaded:
        return 0
    generator = torch.Generator().manual_seed(batch_seed(args.seed, loaded[0][0].output.name))
    try:
        outputs = engine.upscale([image for _, image in loaded], generator=generator, steps=args.steps,
                                 sampler=sampler, batch_size=len(loaded))
    except (FloatingPointError, RuntimeError, ValueError) as error:
        for job, _ in loaded:
            fail(job, f"sampling failed ({one_line(error)})")
        return 0
    written = 0
    for (job, _), output in zip(loaded, outputs):
        try:
            save_png(output, job.output)
        except OSError as error:
            fail(job, f"cannot write {job.output} ({error.strerror or one_line(error)})")
            continue
        written += 1
    return written


def batch_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (--seed, output name): distinct names get unrelated streams."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sum_across_ranks(tally: Tally, device: torch.device, distributed: bool) -> tuple[int, int]:
    if not distributed:
        return tally.written, tally.failed
    import torch.distributed as dist

    counts = torch.tensor([tally.written, tally.failed], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])
