"""Peak memory and time of `python -m sr3_engine upscale` with automatic tiling, and a seam crop.

For each input side (default 256, 512, 1024) a fresh process upscales one photo of that size
(scikit-image's astronaut, resized) x4 with the bundled demo-x4 model and its default sampler
on a schedule respaced to `--steps` (default 5). Either way one denoising step runs: the
default is the posterior mean, one step whatever the schedule (the figures in docs/TILING.md
were taken with the stage-4 model, whose DDIM at strength 0.2 ran one step of 5); a sampler of N
steps takes N times as long on the CPU and needs the same memory. It reports its peak
resident memory (ru_maxrss) and wall time; then, for the smallest size, the untiled output and
one tiled at 512 output pixels are cut across a tile border and saved side by side (untiled |
tiled | 4x difference) as a PNG, centred on where a tile begins.

    python scripts/measure_tiling.py --out out/tiling [--sides 256 512 1024] [--crop docs/tile-seam-crop.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

import sr3_engine as sr3

ONE_RUN = """
import resource, sys, time
from sr3_engine.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - started
print(f"RESULT {code} {seconds:.2f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
"""


def photo(side: int, path: Path) -> Path:
    Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC).save(path)
    return path


def upscale(source: Path, out: Path, steps: int, *extra: str) -> tuple[float, int]:
    command = [sys.executable, "-c", ONE_RUN, "upscale", str(source), "-o", str(out), "--model", "demo-x4",
               "--steps", str(steps), "--overwrite", "--no-progress", *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    _, code, seconds, peak = result.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise SystemExit(f"upscale failed: {result.stderr}")
    return float(seconds), int(peak)


def seam_crop(out: Path, side: int, steps: int, crop: Path) -> None:
    source = photo(side, out / f"seam-{side}.png")
    whole, tiled = out / "whole", out / "tiled"
    upscale(source, whole, steps, "--max-memory", "8G")
    upscale(source, tiled, steps, "--tile", "128", "--tile-overlap", "0")
    a = np.asarray(Image.open(whole / source.name), dtype=np.int16)
    b = np.asarray(Image.open(tiled / source.name), dtype=np.int16)
    engine = sr3.SR3Engine.from_pretrained("demo-x4", progress=False)
    grid = engine.tile_grid(1, (4 * side, 4 * side), tile=512)
    # Centred on where the second tile column begins, half way down the image.
    border, middle = grid.starts[1][1], 2 * side
    rows, columns = slice(middle - 128, middle + 128), slice(border - 128, border + 128)
    difference = np.clip(np.abs(a - b)[rows, columns] * 4, 0, 255)
    sheet = np.concatenate([a[rows, columns], b[rows, columns], difference], axis=1).astype(np.uint8)
    Image.fromarray(sheet).save(crop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/tiling"))
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--crop", type=Path, default=None, help="also write the seam crop here")
    parser.add_argument("--steps", type=int, default=5, help="respace the model's schedule to this many steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in args.sides:
        seconds, peak = upscale(photo(side, args.out / f"astronaut-{side}.png"), args.out / "sr", args.steps)
        megapixels = (4 * side) ** 2 / 1e6
        rows.append({"input": side, "output": 4 * side, "seconds": seconds, "peak_rss_gb": peak / 1e9,
                     "seconds_per_output_mp": seconds / megapixels})
        print(f"{side}x{side} -> {4 * side}x{4 * side}: {seconds:.1f} s ({seconds / megapixels:.2f} s per output "
              f"megapixel), peak RSS {peak / 1e9:.2f} GB", flush=True)
    (args.out / "tiling.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.crop is not None:
        seam_crop(args.out, min(args.sides), args.steps, args.crop)
        print(f"wrote {args.crop}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
