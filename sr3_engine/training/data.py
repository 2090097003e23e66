"""Training data for SR3: (x_up, y0) pairs cut from a folder of images, reproducibly.

Every random choice about a training sample (which image, crop position, flip, blur
strength) is a pure function of the run seed and the sample's position in one endless
stream of samples. Nothing depends on which worker process or rank loads a sample or on
how many have been loaded before, so a resumed run (or a run with a different number of
DataLoader workers) sees exactly the same batches from the position it stopped at.

Images are decoded with `io.load_image` (8-bit RGB, upright per EXIF, decompression-bomb
guard). Pairs are built the way SR3Engine.sample sees its input at inference: the HR crop is
downsampled with `resize.downsample` (antialiased bicubic), optionally blurred (the
paper's conditioning augmentation for cascades), rounded to 8-bit levels (real low-res
inputs are 8-bit images), and turned into the condition by `diffusion.condition`, the
function the engine uses.
Images smaller than the crop are skipped with a warning rather than upscaled: an
upscaled image is already blurry, and training on it teaches the model that blurry HR
targets are correct.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import resize
from ..diffusion import condition
from ..io import (DEFAULT_MAX_PIXELS, INPUT_EXTENSIONS, INPUT_FORMATS, ImageError, image_warnings, load_image,
                  pil_to_tensor, printable)

EXIF_ORIENTATION = 0x0112
# EXIF orientations that rotate by 90 degrees, swapping width and height.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
SampleKey = tuple[int, int]


class DataError(ValueError):
    """The data folder cannot be used; the message names it and says why."""


def derive_seed(seed: int, purpose: str, *counters: int) -> int:
    """A 63-bit seed for one purpose (e.g. "sample", "noise") at the given counters. SeedSequence
    mixes its inputs, so nearby counters give unrelated streams."""
    entropy = [seed, zlib.crc32(purpose.encode()), *counters]
    low, high = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)


def find_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively), sorted so every process sees the same order."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in INPUT_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{root}: no images found (looked for {', '.join(INPUT_EXTENSIONS)})")
    return paths


def usable_images(root: Path, min_size: int, *, warn: bool = True) -> list[Path]:
    """Images under `root` at least `min_size` on both sides; the rest are skipped with one
    warning line (when `warn`). Only headers are read."""
    usable, small, broken = [], [], []
    for path in find_images(root):
        try:
            width, height = image_size(path)
        except DataError as error:
            broken.append(error)
            continue
        (usable if min(width, height) >= min_size else small).append(path)
    if small and warn:
        print_warning(f"skipped {len(small)} image(s) under {root} smaller than {min_size}x{min_size} "
                      f"(first: {small[0]})")
    if broken and warn:
        print_warning(f"skipped {len(broken)} unreadable image(s) under {root} (first: {broken[0]})")
    if not usable:
        raise DataError(f"{root}: no image is at least {min_size}x{min_size}")
    return usable


def fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """A digest of the image list: the sample stream of a run is defined by it. Names are
    taken as the bytes they have on disk, which need not be UTF-8."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path.relative_to(root).as_posix()) + b"\n")
    return digest.hexdigest()


def print_warning(message: str) -> None:
    print(printable(f"sr3_engine: warning: {message}"), file=sys.stderr)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied) from its header.
    Raises DataError for files that `io.load_image` would refuse by format or size."""
    try:
        # Pillow reports damaged EXIF data as bare UserWarnings; `load_image` notes them once
        # the image is decoded, as one line naming the file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path, formats=INPUT_FORMATS) as image:
                width, height = image.size
                orientation = image.getexif().get(EXIF_ORIENTATION)
    # Pillow's header parsers raise many exception types on malformed files (OSError,
    # SyntaxError, struct.error, DecompressionBombError, ...); each means "unusable".
    except Exception as error:
        raise DataError(f"{path}: not a readable PNG, JPEG, WebP, TIFF or BMP image ({error})") from None
    if width * height > DEFAULT_MAX_PIXELS:
        raise DataError(f"{path}: larger than the limit of {DEFAULT_MAX_PIXELS} pixels")
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


def load_crop(path: Path, top: int, left: int, size: int, *,
              note: Callable[[str], object] = print_warning) -> torch.Tensor:
    """The size x size RGB crop at (top, left) of the upright image, as a (3, size, size)
    float32 tensor in [0, 1]. What `load_image` warns about the file goes to `note`."""
    try:
        with image_warnings(lambda warning: note(str(warning))):
            image = load_image(path)
    except ImageError as error:
        raise DataError(str(error)) from None
    return pil_to_tensor(image.crop((left, top, left + size, top + size)))


def centre_crop(path: Path, size: int) -> torch.Tensor:
    """The centre size x size crop of an image, (3, size, size) in [0, 1]."""
    width, height = image_size(path)
    return load_crop(path, (height - size) // 2, (width - size) // 2, size)


def load_centre_crops(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Centre crops of every image, stacked as (N, 3, size, size) in [0, 1]."""
    return torch.stack([centre_crop(path, size) for path in paths])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with edge replication (any image size)."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def make_lr(hr: torch.Tensor, scale: int, blur_sigma: float = 0.0) -> torch.Tensor:
    """The low-res input for HR images (B, 3, H, W) in [0, 1]: antialiased bicubic downsampling,
    an optional Gaussian blur, then rounding to 8-bit levels, as a real input would be."""
    lr = resize.downsample(hr, scale)
    if blur_sigma > 0.0:
        lr = gaussian_blur(lr, blur_sigma)
    return (lr.clamp(0.0, 1.0) * 255.0).round() / 255.0


class CropDataset(Dataset):
    """Maps a key (sample_id, image_index) to (x_up, y0), each (3, hr_size, hr_size) in [-1, 1].
    Crop position, flip and blur sigma come from a generator seeded by (seed, sample_id)."""

    def __init__(self, paths: Sequence[Path], hr_size: int, scale: int, seed: int, blur_sigma: float = 0.0,
                 resampler: str = "bicubic"):
        self.paths = list(paths)
        self.hr_size = hr_size
        self.scale = scale
        self.seed = seed
        self.blur_sigma = blur_sigma
        self.resampler = resampler
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        sample_id, index = key
        rng = np.random.default_rng(derive_seed(self.seed, "sample", sample_id))
        # A file that fails to decode is replaced by the next one, so one bad file in a
        # large folder does not end a long run; the replacement is as deterministic as the rest.
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return self._pair(path, rng)
            except DataError as error:
                self._warn_once(f"{error}; using the next image instead")
        raise DataError(f"{self.paths[0].parent}: none of the {len(self.paths)} training images can be decoded")

    def _warn_once(self, message: str) -> None:
        # Every image is loaded many times over a run; its problems are worth one line each.
        if message not in self._reported:
            self._reported.add(message)
            print_warning(message)

    def _pair(self, path: Path, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = image_size(path)
        top = int(rng.integers(0, height - self.hr_size + 1))
        left = int(rng.integers(0, width - self.hr_size + 1))
        flip = bool(rng.random() < 0.5)
        sigma = float(rng.uniform(0.0, self.blur_sigma)) if self.blur_sigma > 0.0 else 0.0
        hr = load_crop(path, top, left, self.hr_size, note=self._warn_once)[None]
        if flip:
            hr = hr.flip(-1)
        x_up = condition(make_lr(hr, self.scale, sigma), self.scale, resampler=self.resampler)
        return x_up[0], hr[0] * 2.0 - 1.0


class StreamBatchSampler(Sampler[list[SampleKey]]):
    """Endless batches of keys for one rank, DistributedSampler-style.

    The run's samples form one stream: epoch e is a permutation of the images seeded by
    (seed, e). Global step s takes the batch_size * world_size samples from position
    start + s * batch_size * world_size, and rank r takes every world_size-th of them.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, start_position: int = 0):
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    def _image_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_images)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(self.num_images)
        return int(self._order[offset])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        base = self.start_position
        while True:
            positions = [base + j * self.world_size + self.rank for j in range(self.batch_size)]
            yield [(p, self._image_at(p)) for p in positions]
            base += self.samples_per_step


def _single_threaded_worker(worker_id: int) -> None:
    # Each worker runs a few small resizes; torch's default thread pool per worker would
    # oversubscribe the cores that the training process itself needs.
    torch.set_num_threads(1)


def make_loader(dataset: CropDataset, sampler: StreamBatchSampler, *, num_workers: int,
                pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless iterator of (x_up, y0) batches. Samples carry their own seeds, so the
    loader's generator only keeps DataLoader from drawing on the global RNG."""
    generator = torch.Generator().manual_seed(derive_seed(dataset.seed, "loader", sampler.rank,
                                                          sampler.start_position))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=_single_threaded_worker if num_workers else None,
                        generator=generator, persistent_workers=num_workers > 0)
    return iter(loader)
