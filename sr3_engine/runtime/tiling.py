"""Tiled sampling in bounded memory: the denoiser runs on overlapping tiles, blended every step.

The state y_t and the condition x_up stay whole; only the network, whose working memory
grows with the pixels it sees, runs on tiles. At every step each tile of (x_up, y_t) of one
fixed size goes through the denoiser, several tiles per call, and the tiles' eps are
blended back into one eps for the whole image; then the one posterior step updates the
whole image with noise drawn for the whole image. Blending per step (not once at the end)
keeps seams away: every tile refines from a state its neighbours refined too.

Blending. Along each axis a tile's weight is 1, ramping as sin^2 over the `overlap` pixels
at an edge it shares with a neighbour (none at the image border). The tiles form a grid, so
the sum of their 2-D weights is the outer product of the per-axis sums; each per-axis
window is divided by that sum once, and the blended eps is the plain sum of every tile's
eps times its normalised window: a partition of unity, no full-size normaliser.

Sizes (output pixels, multiples of the U-Net's size multiple). The largest square tile
whose working memory (`unet.activation_bytes`, plus a margin) fits the budget bounds the
tile side; each axis then takes the fewest tiles of at most that side that cover it, and
the smallest side that does, so overlaps are no wider than asked. Tiles per denoiser call:
as many as fit the budget. The whole image is not tiled when it fits.

Budget (`max_memory`, bytes of denoiser working memory; the whole-image state, about six
float32 copies of the output image, comes on top): by default half the free device memory
on CUDA; on the CPU a quarter of the available RAM, at most 1 GiB, because a CPU computes
no faster on larger tiles and memory is what users run out of.
"""

from __future__ import annotations

import dataclasses
import math
import os
import torch

from ..config import UNetConfig
from ..samplers import Denoiser
from ..unet import activation_bytes

CPU_BUDGET_CAP = 2**30
# Library workspace (oneDNN, allocator) that activation_bytes does not count, and a margin on it.
WORKSPACE_BYTES = 32 * 2**20
MARGIN = 1.15


class MemoryBudgetError(MemoryError):
    """An image cannot be sampled within the memory budget even in the smallest tiles; the
    message says what was needed and what was allowed, in one line."""


def default_budget(device: torch.device) -> int:
    """Bytes of denoiser working memory allowed when the caller sets no `max_memory`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return min(available_ram() // 4, CPU_BUDGET_CAP)


def available_ram() -> int:
    """RAM the system can give without swapping (MemAvailable on Linux), else physical RAM."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def working_bytes(config: UNetConfig, tiles: int, height: int, width: int, itemsize: int) -> int:
    """The budget `tiles` tiles of height x width take in one denoiser call."""
    return int(MARGIN * activation_bytes(config, tiles, height, width, itemsize)) + WORKSPACE_BYTES


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an image of `size` (height, width) sit, and their blending windows.

    `starts` are the tiles' top (or left) offsets per axis; `windows` the per-axis weights of
    each tile, already divided by the per-axis sum, so that the outer products of one row
    window and one column window over all tiles sum to 1 at every pixel.
    """

    size: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    starts: tuple[tuple[int, ...], tuple[int, ...]]
    tiles_per_call: int

    @property
    def count(self) -> int:
        return len(self.starts[0]) * len(self.starts[1])

    def windows(self, axis: int, device: torch.device) -> list[torch.Tensor]:
        length, side = self.size[axis], self.tile[axis]
        raw = [_window(side, self.overlap, start > 0, start + side < length) for start in self.starts[axis]]
        total = torch.zeros(length, dtype=torch.float64)
        for start, window in zip(self.starts[axis], raw):
            total[start:start + side] += window
        return [(window / total[start:start + side]).float().to(device)
                for start, window in zip(self.starts[axis], raw)]


def _window(side: int, overlap: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    window = torch.ones(side, dtype=torch.float64)
    if overlap > 0:
        ramp = torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap) ** 2
        if ramp_in:
            window[:overlap] = ramp
        if ramp_out:
            window[side - overlap:] = ramp.flip(0)
    return window


def axis_starts(length: int, side: int, overlap: int) -> tuple[int, ...]:
    """Offsets of tiles of `side` covering `length`, consecutive ones overlapping by >= overlap."""
    if side >= length:
        return (0,)
    stride = side - overlap
    starts = list(range(0, length - side, stride))
    return tuple(starts + [length - side])


def fitted_side(length: int, max_side: int, overlap: int, multiple: int) -> int:
    """The smallest side (a multiple of `multiple`, at most max_side) that covers `length` with
    as few tiles as max_side needs."""
    if length <= max_side:
        return length
    count = math.ceil((length - overlap) / (max_side - overlap))
    side = math.ceil((length + (count - 1) * overlap) / count / multiple) * multiple
    return min(max_side, max(side, 2 * overlap + multiple))


def default_overlap(side: int, multiple: int) -> int:
    """A sixteenth of the tile (at least two size multiples): wide enough for the sin^2 ramp to
    hide the tile edges, narrow enough that overlaps cost about 12% more denoiser work."""
    return max(2 * multiple, round(side / 16 / multiple) * multiple)


def check_tile(tile: int | None, overlap: int | None, multiple: int) -> None:
    """Refuse a tile side (output pixels) under the model's size multiple, or an overlap that is
    negative or not under half the tile (rounded down to the multiple), in one line."""
    if tile is not None and tile < multiple:
        raise ValueError(f"tile {tile} is smaller than the model's size multiple {multiple}")
    if overlap is not None and tile is not None and not 0 <= overlap < (tile // multiple * multiple) / 2:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and under half the tile "
                         f"({tile // multiple * multiple})")


def plan_tiles(config: UNetConfig | None, batch: int, size: tuple[int, int], itemsize: int, budget: int, *,
               tile: int | None = None, overlap: int | None = None, multiple: int = 1,
               max_tiles_per_call: int | None = None, max_side: int | None = None) -> TileGrid | None:
    """The tiling of a (batch, C, *size) condition, or None when it runs whole. `tile` forces
    tiles of that side (output pixels), `overlap` their overlap; `max_tiles_per_call` and
    `max_side` are limits of the backend (e.g. a TensorRT profile). A model without a
    UNetConfig has no memory estimate: it is tiled only when asked or when a backend limit
    demands it, one tile per call."""
    height, width = size
    within_limits = ((max_side is None or max(height, width) <= max_side)
                     and (max_tiles_per_call is None or batch <= max_tiles_per_call))
    fits = config is None or working_bytes(config, batch, height, width, itemsize) <= budget
    if tile is None and fits and within_limits:
        return None
    check_tile(tile, overlap, multiple)
    if tile is not None:
        largest = tile // multiple * multiple
    else:
        largest = _largest_side(config, itemsize, budget, multiple) if config is not None else max(height, width)
    if max_side is not None:
        largest = min(largest, max_side // multiple * multiple)
    if overlap is None:
        # The default, but under half of a tile the caller forced to be small.
        overlap = min(default_overlap(min(largest, max(height, width)), multiple),
                      max(0, (largest // 2 - 1) // multiple * multiple) if tile is not None else largest)
    if largest < 2 * overlap + multiple and tile is None:
        side = 2 * overlap + multiple
        if config is None:
            raise MemoryBudgetError(f"a {side}x{side} tile is over the backend's largest tile side {max_side}")
        need = working_bytes(config, 1, side, side, itemsize)
        raise MemoryBudgetError(f"even a {side}x{side} tile needs {need / 2**20:.0f} MiB of working memory; "
                                f"the budget is {budget / 2**20:.0f} MiB")
    if not 0 <= overlap < largest / 2:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and under half the tile ({largest})")
    side_h = fitted_side(height, largest, overlap, multiple)
    side_w = fitted_side(width, largest, overlap, multiple)
    starts = (axis_starts(height, side_h, overlap), axis_starts(width, side_w, overlap))
    total = batch * len(starts[0]) * len(starts[1])
    if config is None:
        per_call = 1
    else:
        per_tile = working_bytes(config, 1, side_h, side_w, itemsize) - WORKSPACE_BYTES
        if per_tile + WORKSPACE_BYTES > budget:
            raise MemoryBudgetError(f"a {side_h}x{side_w} tile needs {(per_tile + WORKSPACE_BYTES) / 2**20:.0f} MiB "
                                    f"of working memory; the budget is {budget / 2**20:.0f} MiB")
        per_call = min(total, (budget - WORKSPACE_BYTES) // per_tile)
    if max_tiles_per_call is not None:
        per_call = min(per_call, max_tiles_per_call)
    return TileGrid((height, width), (side_h, side_w), overlap, starts, per_call)


def _largest_side(config: UNetConfig, itemsize: int, budget: int, multiple: int) -> int:
    side = multiple
    # working_bytes grows with the area: double, then bisect, over multiples of `multiple`.
    while working_bytes(config, 1, 2 * side, 2 * side, itemsize) <= budget and side < 2**16:
        side *= 2
    low, high = side // multiple, 2 * side // multiple
    while high - low > 1:
        middle = (low + high) // 2
        if working_bytes(config, 1, middle * multiple, middle * multiple, itemsize) <= budget:
            low = middle
        else:
            high = middle
    return low * multiple


def fixed_grid(size: tuple[int, int], side: int, overlap: int, tiles_per_call: int) -> TileGrid:
    """Square tiles of exactly `side` over an image of `size`, which must be at least `side`
    on each axis (the serving scheduler pads smaller images up to it): tiles of one shape
    whatever the image, so that tiles of different images can share a denoiser call."""
    if min(size) < side:
        raise ValueError(f"fixed_grid: an image of {size[0]}x{size[1]} is smaller than the tile side {side}")
    check_tile(side, overlap, 1)
    starts = (axis_starts(size[0], side, overlap), axis_starts(size[1], side, overlap))
    return TileGrid(size, (side, side), overlap, starts, tiles_per_call)


class TileBlender:
    """The tiles of `grid` cut out of whole images, and tile outputs blended back: the one
    implementation of the blend, for `TiledDenoiser` and the serving scheduler. A tile is
    (row, column) of the grid, in the order (row, column) of `places`."""

    def __init__(self, grid: TileGrid, device: torch.device):
        self.grid = grid
        self.rows = grid.windows(0, device)
        self.columns = grid.windows(1, device)
        self.places = [(r, c) for r in range(len(grid.starts[0])) for c in range(len(grid.starts[1]))]

    def region(self, place: tuple[int, int]) -> tuple[slice, slice]:
        (tile_h, tile_w), (row_starts, column_starts) = self.grid.tile, self.grid.starts
        r, c = place
        return slice(row_starts[r], row_starts[r] + tile_h), slice(column_starts[c], column_starts[c] + tile_w)

    def cut(self, image: torch.Tensor, place: tuple[int, int]) -> torch.Tensor:
        """The tile at `place` of `image` (C, H, W), a view."""
        rows, columns = self.region(place)
        return image[:, rows, columns]

    def add(self, total: torch.Tensor, place: tuple[int, int], tile_output: torch.Tensor) -> None:
        """total (C, H, W) float32 += the tile's output times its normalised window."""
        rows, columns = self.region(place)
        weight = self.rows[place[0]][:, None] * self.columns[place[1]][None, :]
        total[:, rows, columns] += tile_output.float() * weight


class TiledDenoiser:
    """A denoiser over whole images that runs `denoise` on the tiles of `grid` and blends them.

    `denoise(x_tiles, y_tiles, levels)` sees (n, C, tile_h, tile_w) batches of at most
    grid.tiles_per_call tiles, in order (image, row, column); the result is float32.
    """

    def __init__(self, denoise: Denoiser, grid: TileGrid, device: torch.device):
        self.denoise = denoise
        self.grid = grid
        self.blender = TileBlender(grid, device)
        # Which image of the batch each tile of a call belongs to, made once, not at every step.
        self._images: dict[tuple[int, int], torch.Tensor] = {}
        self._device = device

    def __call__(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        blender = self.blender
        tiles = [(b, place) for b in range(x_up.shape[0]) for place in blender.places]
        eps = torch.zeros(y_t.shape, dtype=torch.float32, device=y_t.device)
        for first in range(0, len(tiles), self.grid.tiles_per_call):
            chunk = tiles[first:first + self.grid.tiles_per_call]
            x_tiles = torch.stack([blender.cut(x_up[b], place) for b, place in chunk])
            y_tiles = torch.stack([blender.cut(y_t[b], place) for b, place in chunk])
            levels = noise_level[self._image_index(chunk, first)]
            tile_eps = self.denoise(x_tiles, y_tiles, levels)
            for k, (b, place) in enumerate(chunk):
                blender.add(eps[b], place, tile_eps[k])
        return eps

    def _image_index(self, chunk: list[tuple[int, tuple[int, int]]], first: int) -> torch.Tensor:
        key = (first, len(chunk))
        if key not in self._images:
            self._images[key] = torch.tensor([b for b, _ in chunk], device=self._device)
        return self._images[key]
