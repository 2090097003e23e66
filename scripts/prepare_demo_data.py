"""Gather the demo model's training and held-out photos from what packages carry offline.

Sources: scikit-image's bundled sample photos, scikit-learn's two sample images, and the
photographs (not the drawings) among Debian's plasma-workspace-wallpapers and
mate-backgrounds, fetched with `apt-get download` and unpacked without installing.
Large wallpapers are downscaled (antialiased) so that a training crop holds detail
rather than out-of-focus blur. Photos are stored as BMP: a training step crops 16 of them,
and decoding a whole PNG for each 64-pixel crop took most of a CPU step. The held-out set never reaches training: it is used for
validation, the schedule search and the held-out figures (README.md, docs/DEMO.md), and the
demo photo comes from it.

    python scripts/prepare_demo_data.py --out data/demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

WALLPAPER_PHOTOS = {
    "plasma-workspace-wallpapers": [
        "usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/DarkestHour/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/Grey/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/Path/contents/images/2560x1600.jpg",
        "usr/share/wallpapers/Volna/contents/images/5120x2880.jpg",
        "usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg",
    ],
    "mate-backgrounds": [
        f"usr/share/backgrounds/mate/nature/{name}.jpg"
        for name in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
                     "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")
    ],
}
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera", "moon", "grass", "gravel", "brick", "coins", "clock")
HELD_OUT = {"skimage-chelsea", "skimage-coffee", "skimage-astronaut", "mate-backgrounds-LadyBird",
            "plasma-workspace-wallpapers-Kite", "plasma-workspace-wallpapers-Path"}
MAX_SHORT_SIDE = 640


def skimage_photos() -> dict[str, Image.Image]:
    import skimage.data

    return {f"skimage-{name}": Image.fromarray(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS}


def sklearn_photos() -> dict[str, Image.Image]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        print("scikit-learn not installed: skipping its two sample images", file=sys.stderr)
        return {}
    bunch = load_sample_images()
    return {f"sklearn-{Path(name).stem}": Image.fromarray(image) for name, image in zip(bunch.filenames, bunch.images)}


def wallpaper_photos(workdir: Path) -> dict[str, Image.Image]:
    photos = {}
    for package, members in WALLPAPER_PHOTOS.items():
        subprocess.run(["apt-get", "download", package], cwd=workdir, check=True, capture_output=True)
        deb = next(workdir.glob(f"{package}_*.deb"))
        root = workdir / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        for member in members:
            path = root / member
            stem = path.parts[-4] if "wallpapers" in member else path.stem
            photos[f"{package}-{stem}"] = Image.open(path)
    return photos


def normalise(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    short = min(image.size)
    if short > MAX_SHORT_SIDE:
        factor = MAX_SHORT_SIDE / short
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--no-wallpapers", action="store_true", help="skip the Debian packages")
    args = parser.parse_args()
    photos = {**skimage_photos(), **sklearn_photos()}
    if not args.no_wallpapers:
        with tempfile.TemporaryDirectory() as workdir:
            photos.update({k: normalise(v) for k, v in wallpaper_photos(Path(workdir)).items()})
    for split in ("train", "val"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
    for name, image in sorted(photos.items()):
        split = "val" if name in HELD_OUT else "train"
        normalise(image).save(args.out / split / f"{name}.bmp")
    counts = {split: len(list((args.out / split).glob("*.bmp"))) for split in ("train", "val")}
    print(f"{counts['train']} training and {counts['val']} held-out photos in {args.out}")
    missing = HELD_OUT - {p.stem for p in (args.out / "val").glob("*.bmp")}
    if missing:
        print(f"held-out photos missing: {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
