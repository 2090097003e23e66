"""Super-resolve the bundled photo x4 with the bundled model (what `make demo` runs).

The photo is a 64x64 crop of scikit-image's "chelsea", made from its 256x256 original
exactly as training inputs are made; the demo model never saw that photo. The demo
writes the SR3 output and a side-by-side sheet (LR nearest-upscaled | bicubic | SR3 | HR)
and prints where they are, how long sampling took and how the output scores against
bicubic on this one photo (PSNR, SSIM and detail: one photo, one draw; README.md,
docs/DEMO.md and the model's RECIPE.md give the held-out figures).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from .. import metrics, resize
from ..io import load_image, one_line, pil_to_tensor, save_png, tensor_to_pil
from ..runtime.backends import ENGINE_BACKENDS, BackendUnavailableError
from ..runtime.engine import SR3Engine, engine_dtype, precision_name
from ..runtime.model_dir import ASSETS_DIR
from ..samplers import make_plan
from .common import (EXIT_OK, EXIT_USAGE, UsageError, add_device_argument, add_dtype_argument, add_sampler_arguments,
                     parse_device, print_error, sampler_config)
from .evaluate import contact_sheet, nearest_up

PHOTO_LR = ASSETS_DIR / "photos" / "chelsea-lr.png"
PHOTO_HR = ASSETS_DIR / "photos" / "chelsea-hr.png"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-x4", help="model directory or bundled model name")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--steps", type=int, default=None, help="default: the model's tuned schedule")
    add_sampler_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="fused",
                        help="engine backend (fused: the fastest on a CPU too, see bench/RESULTS.md)")
    add_device_argument(parser, default="cpu")
    add_dtype_argument(parser)
    args = parser.parse_args(argv)

    try:
        engine = SR3Engine.from_pretrained(args.model, device=parse_device(args.device), backend=args.backend,
                                           dtype=engine_dtype(args.dtype))
        schedule = engine.schedule_for(args.steps)
        sampler = sampler_config(engine, args)
    except (OSError, ValueError, UsageError, BackendUnavailableError) as error:
        print_error(one_line(error))
        return EXIT_USAGE
    lr = pil_to_tensor(load_image(PHOTO_LR))[None]
    hr = pil_to_tensor(load_image(PHOTO_HR))[None]
    steps = make_plan(schedule, sampler, engine.prediction).num_steps
    step_count = f"{steps} denoising step{'s' if steps != 1 else ''}"
    print(f"upscaling {PHOTO_LR.name} {lr.shape[-1]}x{lr.shape[-2]} -> x{engine.scale} with {args.model} "
          f"({sampler.name}, {step_count}, strength {sampler.strength}, {args.device}, "
          f"{args.backend} backend, {precision_name(engine.dtype)}; {engine.dtype_reason})")
    started = time.perf_counter()
    sr = engine.sample(lr, generator=torch.Generator().manual_seed(args.seed), schedule=schedule, sampler=sampler).cpu()
    seconds = time.perf_counter() - started

    bicubic = resize.upsample(lr, engine.scale).clamp(0.0, 1.0)
    output = save_png(tensor_to_pil(sr[0]), args.out / "chelsea-sr3.png")
    sheet = save_png(contact_sheet([(nearest_up(lr[0], engine.scale), bicubic[0], sr[0], hr[0])]),
                     args.out / "chelsea-sheet.png")
    print(f"sampling took {seconds:.1f} s")
    print(f"PSNR  SR3 {metrics.psnr(sr, hr).item():.2f} dB, bicubic {metrics.psnr(bicubic, hr).item():.2f} dB "
          f"(RGB in [0, 255]); SSIM SR3 {metrics.ssim(sr, hr).item():.4f}, bicubic {metrics.ssim(bicubic, hr).item():.4f}")
    print(f"detail SR3 {metrics.detail(sr, hr).item():.2f}, bicubic {metrics.detail(bicubic, hr).item():.2f} "
          "(mean |Laplacian| over the photo's: 1 is as sharp as the photo)")
    print(f"wrote {output}")
    print(f"wrote {sheet} (LR nearest | bicubic | SR3 | HR)")
    return EXIT_OK
