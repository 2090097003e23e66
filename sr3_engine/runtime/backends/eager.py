"""The reference backend: the PyTorch module as it is, one Python-level step at a time."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...samplers import Denoiser, GeneratorNoise, NoiseSource, SamplingPlan, StepCallback
from ...unet import set_op_backend
from ..tiling import TileGrid
from .base import run_eagerly


class EagerBackend:
    name = "eager"
    tile_limits = (None, None)
    bf16_devices = ("cpu", "cuda")

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto"):
        self.device = device
        self.dtype = dtype
        self.op_backend = op_backend
        self.model = model.to(device=device, dtype=dtype).eval()
        set_op_backend(self.model, op_backend)

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor:
        return run_eagerly(self.model, self.device, x_up.to(self.dtype), y_T, plan, generator=generator,
                           callback=callback, tiles=tiles, op_backend=self.op_backend)

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        return GeneratorNoise(generator)

    def tile_denoiser(self, capacity: int) -> Denoiser:
        return self.model
