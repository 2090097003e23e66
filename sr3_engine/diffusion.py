"""Forward process, conditioning and the training objective (SR3 eq. 5-6).

The network is conditioned on a continuous noise level, not on the step index:
training draws t uniformly from 1..T, then the level uniformly between the schedule's
levels at t - 1 and t. That is what lets inference use a different, much shorter
schedule than training.

`condition` is the one place the conditioning image x_up is made, for training, evaluation
and the engine alike: a model is served with the condition it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import resize

from .config import NOISE_LEVEL_INPUTS
from .schedules import NoiseSchedule


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's own device, so a seed gives the same
    numbers whatever device the result is used on."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where draws from `generator` are made: its own device (the CPU without one)."""
    return generator.device if generator is not None else torch.device("cpu")


def q_sample(y0: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y~ = sqrt(gamma) y0 + sqrt(1 - gamma) eps, with noise_level = sqrt(gamma) of shape (B,)."""
    level = noise_level.reshape(-1, *([1] * (y0.dim() - 1))).to(y0.dtype)
    return level * y0 + torch.sqrt(1.0 - level * level) * noise


def condition(lr: torch.Tensor, scale: int, size_multiple: int = 1, resampler: str = "bicubic") -> torch.Tensor:
    """x_up for low-res images lr (B, C, h, w) in [0, 1]: upsampled by `scale` with the model's
    resampler (`resize.RESAMPLERS`), mapped to [-1, 1] and clamped there, then padded by
    replicating the last row and column up to multiples of `size_multiple` (what the U-Net
    takes). The image is x_up[..., :h*scale, :w*scale]."""
    if resampler == "bicubic":
        # Upsampled in [-1, 1], as every model trained here so far was conditioned.
        x_up = resize.upsample(lr * 2.0 - 1.0, scale).clamp(-1.0, 1.0)
    else:
        x_up = resize.upsample(lr, scale, resampler) * 2.0 - 1.0
    height, width = x_up.shape[-2:]
    pad_h, pad_w = (-height) % size_multiple, (-width) % size_multiple
    if pad_h or pad_w:
        x_up = F.pad(x_up, (0, pad_w, 0, pad_h), mode="replicate")
    return x_up


def output_image(y0: torch.Tensor) -> torch.Tensor:
    """A sampled y_0 in [-1, 1] as an image in [0, 1], float32 (the inverse of `condition`'s mapping)."""
    return ((y0.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_noise_levels(schedule: NoiseSchedule, batch: int, *, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", space: str = "sqrt_gamma") -> torch.Tensor:
    """Continuous sqrt(gamma) levels of shape (B,), float32.

    `space` says in which quantity the draw between neighbouring levels is uniform:
    sqrt(gamma) (the widely used open implementation) or gamma (the paper).
    """
    if space not in NOISE_LEVEL_INPUTS:
        raise ValueError(f"sample_noise_levels: space must be one of {NOISE_LEVEL_INPUTS}; got {space!r}")
    gen_device = generator_device(generator)
    t = torch.randint(1, schedule.num_steps + 1, (batch,), generator=generator, device=gen_device)
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    prev_name, name = ("noise_levels_prev", "noise_levels") if space == "sqrt_gamma" else ("gammas_prev", "gammas")
    upper = schedule.table(prev_name, gen_device, torch.float64)[t - 1]
    lower = schedule.table(name, gen_device, torch.float64)[t - 1]
    drawn = lower + u * (upper - lower)
    level = drawn if space == "sqrt_gamma" else torch.sqrt(drawn)
    return level.to(device=device, dtype=torch.float32)


def diffusion_loss(model: nn.Module, x_up: torch.Tensor, y0: torch.Tensor, schedule: NoiseSchedule,
                   p: int = 1, *, generator: torch.Generator | None = None,
                   level_space: str | None = None) -> torch.Tensor:
    """Mean of |f(x, y~, level) - eps|^p over every element (eq. 6), p in {1, 2}.

    `level_space` defaults to the model's `config.noise_level_input` when it has one (looking
    through a DistributedDataParallel wrapper's `.module`).
    """
    if p not in (1, 2):
        raise ValueError(f"diffusion_loss: p must be 1 or 2; got {p!r}")
    if x_up.shape != y0.shape:
        raise ValueError(f"diffusion_loss: x_up {tuple(x_up.shape)} and y0 {tuple(y0.shape)} differ in shape")
    if level_space is None:
        config = getattr(getattr(model, "module", model), "config", None)
        level_space = getattr(config, "noise_level_input", "sqrt_gamma")
    levels = sample_noise_levels(schedule, y0.shape[0], generator=generator, device=y0.device, space=level_space)
    noise = randn(tuple(y0.shape), generator, y0.device, y0.dtype)
    y_noisy = q_sample(y0, levels, noise)
    eps_hat = model(x_up, y_noisy, levels)
    diff = (eps_hat.float() - noise.float()).abs()
    return diff.mean() if p == 1 else (diff * diff).mean()
