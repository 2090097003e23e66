"""Convert a checkpoint of the most used open SR3 implementation (_gen.pth) into a model directory.

    python -m sr3_engine convert I640000_E37_gen.pth --config sr_sr3_16_128.json --out sr3-faces

runtime/convert.py says what is read, checked and written. Exit codes: 0 written, 2 the file
or the config cannot be converted (one line naming the file and the field); nothing is
written then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..runtime.convert import INFERENCE_STEPS, ConvertError, convert
from .common import EXIT_OK, EXIT_USAGE, positive_int, print_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="their I{iter}_E{epoch}_gen.pth")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it exists)")
    parser.add_argument("--config", type=Path, help="their training JSON (// comments allowed); without it the "
                        "architecture is read off the tensor shapes")
    parser.add_argument("--image-size", type=positive_int, help="without --config: their model.diffusion.image_size "
                        "(needed when the U-Net has attention outside its middle)")
    parser.add_argument("--norm-groups", type=positive_int, help="without --config: their model.unet.norm_groups")
    parser.add_argument("--scale", type=positive_int, help="without --config: r_resolution / l_resolution")
    parser.add_argument("--steps", type=positive_int, default=INFERENCE_STEPS,
                        help=f"default inference steps, respaced from their val schedule (default {INFERENCE_STEPS})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(args.checkpoint, args.out, config=args.config, image_size=args.image_size,
                         norm_groups=args.norm_groups, scale=args.scale, steps=args.steps)
    except (ConvertError, OSError) as error:
        print_error(str(error))
        return EXIT_USAGE
    spec = result.spec
    print(f"wrote {result.directory}: x{spec.scale}, {spec.model.inner_channels} channels, mults "
          f"{list(spec.model.channel_mults)}, {spec.model.res_blocks} res blocks, attention at "
          f"{list(spec.model.attn_resolutions)}, {spec.model.norm_groups} groups; conditioned with {spec.resampler}")
    if result.train_schedule is not None:
        train = result.train_schedule
        print(f"training schedule: {train.kind}, {train.steps} steps, betas {train.start:g}..{train.end:g}; default "
              f"inference: {spec.schedule.respace} steps respaced from it ({spec.sampler.name})")
    for what in result.inferred:
        print(f"note: inferred {what}", file=sys.stderr)
    return EXIT_OK
