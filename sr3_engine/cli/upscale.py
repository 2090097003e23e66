"""Super-resolve image files and folders to PNGs.

    python -m sr3_engine upscale IN... -o OUTDIR --model DIR

Built for unattended runs over folders of user images: a bad input costs one line on
stderr (`error: <path>: <reason>`) and never the run, and the exit code tells a script
what happened: 0 every input written (or skipped), 1 some inputs failed, 2 the command
itself is unusable (bad flags, no usable input, an output that would replace an input, an
output folder that cannot be written, a model that cannot be loaded), 130 after Ctrl-C,
143 after SIGTERM.

Each input becomes `OUTDIR/<stem>.png`; inputs sharing a stem get `<stem>-2.png`, ... in
input order, decided over the whole input list so that ranks never collide.

No file is ever lost or clobbered. An output that would be one of the inputs stops the
command before anything runs. An output that already exists is refused for its input
unless --overwrite; --skip-existing skips that input instead, which resumes a folder job.
Each PNG is written to a temporary name, then linked to its final name, which fails if the
name exists (with --overwrite: renamed over it), so of two processes sharing an output
folder exactly one writes each name and the other reports the clash. Ctrl-C and SIGTERM
delete the temporary file on the way out; the ones a SIGKILL leaves are swept by the next
run (`io.sweep_temporaries`).

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
import hashlib
import os
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io import (DEFAULT_MAX_PIXELS, ImageError, check_file, check_writable, collect_inputs, image_warnings,
                  load_image, one_line, outscaled, output_names, printable, save_png,
                  sweep_temporaries)
from ..runtime.backends import ENGINE_BACKENDS
from ..runtime.engine import SR3Engine, engine_dtype
from ..runtime.tiling import MemoryBudgetError, check_tile
from ..samplers import SamplerConfig
from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, TILE_HINT, UsageError, add_device_argument,
                     add_dtype_argument, add_sampler_arguments, add_tiling_arguments, engine_line, loaded_engine,
                     parse_device, positive_float, positive_int, print_error, run_until_stopped, sampler_config,
                     tile_pixels)


class Job(NamedTuple):
    source: Path
    output: Path


Groups = dict[tuple[tuple[int, int], str], list[Job]]


class Report:
    """What happened to each job: the counts, and the lines on stderr, which go through the
    progress bar so that the two do not garble each other."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.written = self.skipped = self.failed = 0

    def note(self, message: str) -> None:
        tqdm.write(printable(f"note: {message}"), file=sys.stderr)

    def fail(self, job: Job, reason: str) -> None:
        tqdm.write(printable(f"error: {ImageError(job.source, reason)}"), file=sys.stderr)
        self.failed += 1
        self.bar.update(1)

    def skip(self, job: Job) -> None:
        self.note(f"{job.source}: skipped, {job.output} exists")
        self.skipped += 1
        self.bar.update(1)

    def wrote(self) -> None:
        self.written += 1
        self.bar.update(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine upscale",
                                     description="Super-resolve images with an SR3 model; one PNG per input.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files and folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument("--model", required=True, help="model directory or bundled model name")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace outputs that already exist (default: refuse those inputs)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip inputs whose output already exists (resumes a folder job)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's schedule)")
    add_sampler_arguments(parser)
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="eager", help="engine backend")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images of one size sampled together")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (see the module docs)")
    add_tiling_arguments(parser)
    parser.add_argument("--outscale", type=positive_float, metavar="X",
                        help="resize each output (LANCZOS) to X times its input's size (default: the model's scale)")
    add_device_argument(parser, default="cpu")
    add_dtype_argument(parser)
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject inputs with more pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true", help="shard inputs over torchrun processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_until_stopped(lambda: run(args))


def run(args: argparse.Namespace) -> int:
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
    planned = plan_jobs(args.inputs, args.output)
    refuse_writing_over_inputs(planned)
    check_output_folder(args.output)
    show_progress = not args.no_progress and rank == 0 and sys.stderr.isatty()
    engine = load_engine(args, device, show_progress)
    if rank == 0:
        print(engine_line(args.model, engine), flush=True)
    sampler = sampler_config(engine, args)
    try:
        check_tile(tile_pixels(args.tile, engine.scale), tile_pixels(args.tile_overlap, engine.scale),
                   engine.size_multiple)
    except ValueError as error:
        raise UsageError(f"--tile {args.tile} --tile-overlap {args.tile_overlap}: {error} (in output pixels, "
                         f"x{engine.scale})") from None
    make_output_folder(args.output)
    jobs = planned[rank::world_size]
    with tqdm(total=len(jobs), desc="upscaling", unit="image", disable=not show_progress) as bar:
        report = Report(bar)
        announce_renames(jobs, report)
        for batch in batches(validate(unclaimed(jobs, args, report), args.max_pixels, report), args.batch_size):
            upscale_batch(engine, sampler, batch, args, report)
    written, skipped, failed = sum_across_ranks(report, device, args.distributed)
    if rank == 0:
        skips = f", {skipped} skipped" if skipped else ""
        print(printable(f"{written} written to {args.output}{skips}, {failed} failed"))
    return EXIT_FAILED if failed else EXIT_OK


def plan_jobs(inputs: list[str], outdir: Path) -> list[Job]:
    """A job per input; a UsageError when there is no input at all, or none is a file."""
    # Outputs of an earlier run inside an input folder are not inputs of this one.
    sources = collect_inputs(inputs, exclude=[outdir])
    if not sources:
        raise UsageError(f"no images found in {' '.join(inputs)} (extensions: png jpg jpeg webp tif tiff bmp)")
    if not any(source.is_file() for source in sources):
        # Each of them fails check_file; the first says why.
        try:
            check_file(sources[0])
        except ImageError as error:
            more = f" (and {len(sources) - 1} more input(s) that are not files)" if len(sources) > 1 else ""
            raise UsageError(f"{error}{more}") from None
    return [Job(source, outdir / name) for source, name in zip(sources, output_names(sources))]


def refuse_writing_over_inputs(jobs: list[Job]) -> None:
    """`-o .` beside the photos would replace them with their upscaled versions."""
    inputs = {}
    for job in jobs:
        with contextlib.suppress(OSError):
            status = job.source.stat()
            inputs[status.st_dev, status.st_ino] = job.source
    for job in jobs:
        try:
            status = job.output.stat()
        except OSError:
            continue
        source = inputs.get((status.st_dev, status.st_ino))
        if source is not None:
            raise UsageError(f"{job.output}: is the input {source}; writing there would replace it "
                             "(choose another output folder)")


def check_output_folder(outdir: Path) -> None:
    """Before hours of sampling, not after them."""
    try:
        check_writable(outdir)
    except OSError as error:
        raise UsageError(f"{outdir}: cannot write in the output folder ({error.strerror or one_line(error)})") from None


def make_output_folder(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{outdir}: cannot create the output folder ({error.strerror or error})") from None
    sweep_temporaries(outdir)


def announce_renames(jobs: list[Job], report: Report) -> None:
    for job in jobs:
        if job.output.stem != job.source.stem:
            report.note(f"{job.source} is written as {job.output} (another input has the stem {job.source.stem!r})")


def unclaimed(jobs: list[Job], args: argparse.Namespace, report: Report) -> list[Job]:
    """The jobs whose output does not exist yet (all of them with --overwrite); the others
    are skipped or refused."""
    if args.overwrite:
        return jobs
    pending = []
    for job in jobs:
        if os.path.lexists(job.output):
            output_exists(job, args, report)
        else:
            pending.append(job)
    return pending


def output_exists(job: Job, args: argparse.Namespace, report: Report) -> None:
    if args.skip_existing:
        report.skip(job)
    else:
        report.fail(job, f"{job.output} already exists (--overwrite replaces it, --skip-existing skips such inputs)")


def load_engine(args: argparse.Namespace, device: torch.device, show_progress: bool) -> SR3Engine:
    engine = loaded_engine(lambda: SR3Engine.from_pretrained(
        args.model, backend=args.backend, device=device, dtype=engine_dtype(args.dtype), progress=show_progress,
        max_memory=args.max_memory), model=args.model, backend=args.backend)
    if args.steps is not None:
        try:
            engine.schedule_for(args.steps)
        except ValueError as error:
            raise UsageError(f"--steps {args.steps}: {error}") from None
    return engine


def validate(jobs: list[Job], max_pixels: int, report: Report) -> Groups:
    """Decode every input once, reporting the bad ones and the notes about the good ones;
    the good ones grouped by (size, mode) in order of first appearance."""
    groups: Groups = {}
    for job in jobs:
        try:
            with image_warnings(lambda warning: report.note(str(warning))):
                image = load_image(job.source, max_pixels)
        except ImageError as error:
            report.fail(job, error.reason)
            continue
        groups.setdefault((image.size, image.mode), []).append(job)
    return groups


def batches(groups: Groups, batch_size: int) -> Iterator[list[Job]]:
    for jobs in groups.values():
        for start in range(0, len(jobs), batch_size):
            yield jobs[start:start + batch_size]


def upscale_batch(engine: SR3Engine, sampler: SamplerConfig, batch: list[Job], args: argparse.Namespace,
                  report: Report) -> None:
    """Sample one batch and write its PNGs."""
    loaded: list[tuple[Job, Image.Image]] = []
    for job in batch:
        try:
            # `validate` printed the notes about this image already.
            with image_warnings(lambda warning: None):
                loaded.append((job, load_image(job.source, args.max_pixels)))
        except ImageError as error:
            report.fail(job, error.reason)
    if not loaded:
        return
    generator = torch.Generator().manual_seed(batch_seed(args.seed, loaded[0][0].output.name))
    try:
        outputs = engine.upscale([image for _, image in loaded], generator=generator, steps=args.steps,
                                 sampler=sampler, batch_size=len(loaded), tile=tile_pixels(args.tile, engine.scale),
                                 tile_overlap=tile_pixels(args.tile_overlap, engine.scale))
    except MemoryBudgetError as error:
        for job, _ in loaded:
            report.fail(job, f"{one_line(error)} ({TILE_HINT})")
        return
    except (FloatingPointError, RuntimeError, ValueError, MemoryError) as error:
        for job, _ in loaded:
            report.fail(job, f"sampling failed ({one_line(error)})")
        return
    for (job, image), output in zip(loaded, outputs):
        if args.outscale is not None:
            output = outscaled(output, image.size, args.outscale)
        try:
            save_png(output, job.output, overwrite=args.overwrite)
        except FileExistsError:
            # Another process wrote it since `unclaimed` looked.
            output_exists(job, args, report)
            continue
        except OSError as error:
            report.fail(job, f"cannot write {job.output} ({error.strerror or one_line(error)})")
            continue
        report.wrote()


def batch_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (--seed, output name): distinct names get unrelated streams. The
    name is taken as the bytes it has on disk, which need not be UTF-8."""
    digest = hashlib.sha256(b"%d:%s" % (seed, os.fsencode(name))).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sum_across_ranks(report: Report, device: torch.device, distributed: bool) -> tuple[int, int, int]:
    """(written, skipped, failed) over every rank."""
    counts = (report.written, report.skipped, report.failed)
    if not distributed:
        return counts
    import torch.distributed as dist

    total = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total[0]), int(total[1]), int(total[2])
