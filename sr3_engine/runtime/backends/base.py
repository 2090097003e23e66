"""What every engine backend is, and the one eager run that all but the fused CUDA path share."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ...samplers import Denoiser, NoiseSource, SamplingPlan, StepCallback, run_plan
from ..onnx_export import DEFAULT_OPSET, ExportError, export_onnx
from ..tiling import TileGrid, TiledDenoiser


class BackendUnavailableError(RuntimeError):
    """A backend the caller named cannot run here; the message says why."""


class Backend(Protocol):
    """`run` applies a whole plan; with `tiles` the denoiser runs on that grid's tiles, blended
    every step. `tile_limits` is (most tiles per denoiser call, largest tile side) or Nones;
    `bf16_devices` the device types (cpu, cuda) where it computes bf16 natively when the device does."""

    name: str
    bf16_devices: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    tile_limits: tuple[int | None, int | None]

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor: ...

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        """Where a run that steps the plan itself (tiled, or the serving scheduler) takes each
        step's noise for a caller's `generator`: the generator's own draws, or on fused CUDA a
        seed for the posterior kernel, as the backend's own runs take it."""
        ...

    def tile_denoiser(self, capacity: int) -> Denoiser:
        """The denoiser the serving scheduler calls on batches of at most `capacity` tiles of one
        shape, x_up and y_t in the engine's dtype and noise_level (n,) float32, from inside
        inference mode; its output is valid until its next call."""
        ...


def run_eagerly(denoise: Callable, device: torch.device, x_up: torch.Tensor, y_T: torch.Tensor,
                plan: SamplingPlan, *, generator: torch.Generator | None, callback: StepCallback | None,
                tiles: TileGrid | None, op_backend: str) -> torch.Tensor:
    """`samplers.run_plan` with `denoise` on the whole image, or on the tiles of `tiles`."""
    if tiles is not None:
        denoise = TiledDenoiser(denoise, tiles, device)
    with torch.inference_mode():
        return run_plan(denoise, x_up, y_T, plan, generator=generator, callback=callback, backend=op_backend)


def onnx_file(backend: str, model: nn.Module, dtype: torch.dtype, onnx_path: str | None,
              opset: int | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The ONNX file a backend runs: `onnx_path` as it is, or a copy of `model` in `dtype` exported
    into a temporary directory, returned with it so that the backend keeps it for its life."""
    if onnx_path is not None:
        if opset is not None:
            raise ValueError(f"engine backend {backend!r}: opset applies to an export; onnx_path is already one")
        return Path(onnx_path), None
    tmpdir = tempfile.TemporaryDirectory(prefix=f"sr3_{backend}_")
    path = Path(tmpdir.name) / "denoiser.onnx"
    try:
        export_onnx(copy.deepcopy(model).to("cpu", dtype), path, opset=opset or DEFAULT_OPSET)
    except ExportError as error:
        tmpdir.cleanup()
        raise BackendUnavailableError(f"engine backend {backend!r}: {error}") from None
    return path, tmpdir
