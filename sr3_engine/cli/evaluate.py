"""Score a model against bicubic on held-out photos (PSNR, SSIM, consistency, detail, contact sheet).

For every image under --data: the centre HR crop of --crop pixels, its low-res input made
exactly as in training (antialiased bicubic downsampling, rounded to 8-bit levels), the
model's output (--samples draws, seeds 0..K-1) and plain bicubic upsampling of the same
input. PSNR and SSIM are computed on RGB in [0, 255] (rounded to 8-bit levels), the
consistency (SR3 section 4: MSE between the output downsampled by the training kernel and
the input) on [0, 1], the detail as mean |Laplacian| of the output over that of the HR crop
(1: as much fine detail as the photo; bicubic is well under 1). Results go to a table on
stdout, `results.json` and a contact sheet
`contact_sheet.png` (LR nearest | bicubic | SR3 | HR, one row per image) under --out. An
image that cannot be decoded is skipped with a warning line and listed in results.json.

    python -m sr3_engine evaluate --model demo-x4 --data data/demo/val --scale 4 --steps 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .. import metrics, resize
from ..io import atomic_path, one_line, printable, save_png, tensor_to_pil
from ..runtime.backends import ENGINE_BACKENDS, BackendUnavailableError
from ..runtime.engine import SR3Engine, engine_dtype, precision_name
from ..runtime.tiling import MemoryBudgetError
from ..samplers import SamplerConfig
from ..schedules import NoiseSchedule
from ..training.data import DataError, centre_crop, make_lr, print_warning, usable_images
from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, TILE_HINT, UsageError, add_device_argument,
                     add_dtype_argument, add_sampler_arguments, add_tiling_arguments, engine_line, parse_device,
                     print_error, run_until_stopped, sampler_config, tile_pixels)

SHEET_LABELS = ("LR (nearest)", "bicubic", "SR3", "HR")


@dataclasses.dataclass(frozen=True)
class Scores:
    psnr: float
    ssim: float
    consistency: float
    detail: float


@dataclasses.dataclass(frozen=True)
class ImageResult:
    name: str
    model: Scores
    bicubic: Scores


def score(output: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor, scale: int) -> list[Scores]:
    """Per-image scores of outputs (B, 3, H, W) in [0, 1] against their HR and LR images."""
    psnr = metrics.psnr(output, hr).tolist()
    ssim = metrics.ssim(output, hr).tolist()
    cons = metrics.consistency(output, lr, scale).tolist()
    detail = metrics.detail(output, hr).tolist()
    return [Scores(*values) for values in zip(psnr, ssim, cons, detail)]


def mean_scores(scores: Sequence[Scores]) -> Scores:
    count = len(scores)
    return Scores(*(sum(getattr(s, f.name) for s in scores) / count for f in dataclasses.fields(Scores)))


def super_resolve(engine: SR3Engine, lr: torch.Tensor, *, samples: int, steps: int | None, batch_size: int,
                  sampler: SamplerConfig | None = None, schedule: NoiseSchedule | None = None,
                  tile: int | None = None, tile_overlap: int | None = None) -> list[torch.Tensor]:
    """`samples` outputs for every image, draw k with a generator seeded k. `tile` and
    `tile_overlap` are in output pixels (None: the engine's)."""
    draws = []
    for k in range(samples):
        generator = torch.Generator().manual_seed(k)
        chunks = [engine.sample(lr[i:i + batch_size], generator=generator, steps=steps, sampler=sampler,
                                schedule=schedule, tile=tile, tile_overlap=tile_overlap)
                  for i in range(0, lr.shape[0], batch_size)]
        draws.append(torch.cat(chunks).cpu())
    return draws


def evaluate(engine: SR3Engine, hr: torch.Tensor, names: Sequence[str], *, samples: int = 1,
             steps: int | None = None, batch_size: int = 4, sampler: SamplerConfig | None = None,
             schedule: NoiseSchedule | None = None, tile: int | None = None, tile_overlap: int | None = None
             ) -> tuple[list[ImageResult], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores for HR crops (N, 3, H, W) in [0, 1]; also returns the LR inputs, their bicubic
    upsampling and the model's first draw. `sampler`, `schedule`, `tile` and `tile_overlap`
    (output pixels) override the engine's."""
    scale = engine.scale
    lr = make_lr(hr, scale)
    bicubic = resize.upsample(lr, scale).clamp(0.0, 1.0)
    draws = super_resolve(engine, lr, samples=samples, steps=steps, batch_size=batch_size, sampler=sampler,
                          schedule=schedule, tile=tile, tile_overlap=tile_overlap)
    per_draw = [score(draw, hr, lr, scale) for draw in draws]
    bicubic_scores = score(bicubic, hr, lr, scale)
    results = [
        ImageResult(name, mean_scores([draw_scores[i] for draw_scores in per_draw]), bicubic_scores[i])
        for i, name in enumerate(names)
    ]
    return results, lr, bicubic, draws[0]


def contact_sheet(rows: Sequence[Sequence[torch.Tensor]], labels: Sequence[str] = SHEET_LABELS) -> Image.Image:
    """A grid of (3, H, W) images in [0, 1], all the same size, with a label over each column."""
    height, width = rows[0][0].shape[-2:]
    header, gap = 14, 4
    sheet = Image.new("RGB", (len(labels) * (width + gap) - gap, header + len(rows) * (height + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((column * (width + gap) + 2, 1), label, fill="black")
    for r, row in enumerate(rows):
        for column, image in enumerate(row):
            sheet.paste(tensor_to_pil(image), (column * (width + gap), header + r * (height + gap)))
    return sheet


def nearest_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return lr.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def format_table(results: Sequence[ImageResult]) -> str:
    lines = [f"{'image':<40} {'PSNR sr3':>9} {'bicubic':>8} {'SSIM sr3':>9} {'bicubic':>8} "
             f"{'cons sr3':>10} {'bicubic':>10} {'detail sr3':>10} {'bicubic':>8}"]
    rows = [(r.name, r.model, r.bicubic) for r in results]
    rows.append(("mean", mean_scores([r.model for r in results]), mean_scores([r.bicubic for r in results])))
    for name, model, bicubic in rows:
        label = printable(name)[:40]
        lines.append(f"{label:<40} {model.psnr:9.2f} {bicubic.psnr:8.2f} {model.ssim:9.4f} {bicubic.ssim:8.4f} "
                     f"{model.consistency:10.2e} {bicubic.consistency:10.2e} {model.detail:10.2f} "
                     f"{bicubic.detail:8.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory or bundled model name")
    parser.add_argument("--data", required=True, type=Path, help="folder of held-out HR photos")
    parser.add_argument("--scale", type=int, required=True, help="must equal the model's scale")
    parser.add_argument("--steps", type=int, default=None, help="respace the model's schedule to N steps")
    parser.add_argument("--samples", type=int, default=1, help="draws per image; scores are their mean")
    parser.add_argument("--crop", type=int, default=256, help="HR centre-crop size (a multiple of --scale)")
    add_sampler_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=None)
    add_device_argument(parser, default="cpu")
    add_dtype_argument(parser)
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="eager", help="engine backend")
    add_tiling_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("evaluation"))
    args = parser.parse_args(argv)
    for name in ("samples", "crop", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.crop % args.scale:
        parser.error(f"--crop {args.crop} is not a multiple of --scale {args.scale}")
    return args


def load_crops(paths: Sequence[Path], size: int,
               limit: int | None) -> tuple[list[torch.Tensor], list[Path], list[Path]]:
    """Centre crops of the first `limit` images that decode, those images, and the ones that
    did not (each reported with one warning line)."""
    crops, used, skipped = [], [], []
    for path in paths:
        if limit is not None and len(used) == limit:
            break
        try:
            crops.append(centre_crop(path, size))
            used.append(path)
        except DataError as error:
            print_warning(f"{error}; skipped")
            skipped.append(path)
    return crops, used, skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_until_stopped(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    try:
        engine = SR3Engine.from_pretrained(args.model, backend=args.backend, device=parse_device(args.device),
                                           dtype=engine_dtype(args.dtype), progress=False,
                                           max_memory=args.max_memory)
        paths = usable_images(args.data, args.crop)
        if engine.scale != args.scale:
            raise UsageError(f"{args.model}: the model upscales x{engine.scale}, not x{args.scale}")
        sampler = sampler_config(engine, args)
    except (OSError, ValueError, DataError, UsageError, BackendUnavailableError, MemoryError) as error:
        print_error(one_line(error))
        return EXIT_USAGE

    print(engine_line(args.model, engine), flush=True)
    started = time.perf_counter()
    crops, paths, skipped = load_crops(paths, args.crop, args.max_images)
    if not crops:
        print_error(f"{args.data}: none of the images can be decoded")
        return EXIT_USAGE
    hr = torch.stack(crops)
    try:
        results, lr, bicubic, first_draw = evaluate(
            engine, hr, [p.stem for p in paths], samples=args.samples, steps=args.steps, batch_size=args.batch_size,
            sampler=sampler, tile=tile_pixels(args.tile, engine.scale),
            tile_overlap=tile_pixels(args.tile_overlap, engine.scale))
    except MemoryBudgetError as error:
        print_error(f"{one_line(error)} ({TILE_HINT})")
        return EXIT_FAILED
    # The inputs are made here and valid; what the engine refuses is the flags (e.g. a tile overlap
    # of half the tile or more).
    except ValueError as error:
        print_error(one_line(error))
        return EXIT_USAGE
    seconds = time.perf_counter() - started
    print(format_table(results))
    print(f"PSNR and SSIM on RGB in [0, 255]; consistency is an MSE on [0, 1]; detail is mean |Laplacian| over "
          f"the HR crop's. {len(paths)} images, "
          f"{args.samples} sample(s) each, {seconds:.1f} s")

    rows = [(nearest_up(lr[i], args.scale), bicubic[i], first_draw[i], hr[i]) for i in range(len(paths))]
    args.out.mkdir(parents=True, exist_ok=True)
    save_png(contact_sheet(rows), args.out / "contact_sheet.png")
    report = {
        "model": str(args.model), "data": str(args.data), "scale": args.scale, "crop": args.crop,
        "backend": args.backend, "dtype": precision_name(engine.dtype), "dtype_reason": engine.dtype_reason,
        "steps": args.steps if args.steps is not None else engine.schedule.num_steps,
        "sampler": sampler.to_dict(), "samples": args.samples, "seconds": seconds,
        "units": {"psnr": "dB on RGB [0, 255]", "ssim": "RGB [0, 255]", "consistency": "MSE on [0, 1]",
                  "detail": "mean |Laplacian| over the HR crop's"},
        "mean": {"model": dataclasses.asdict(mean_scores([r.model for r in results])),
                 "bicubic": dataclasses.asdict(mean_scores([r.bicubic for r in results]))},
        "images": [dataclasses.asdict(r) for r in results],
        "skipped": [str(path) for path in skipped],
    }
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(printable(f"wrote {args.out / 'results.json'} and {args.out / 'contact_sheet.png'}"))
    return EXIT_OK
