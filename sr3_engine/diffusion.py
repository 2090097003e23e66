"""Forward process, conditioning and the training objective (SR3 eq. 5-6).

The network is conditioned on a continuous noise level, not on the step index:
training draws t uniformly from 1..T, then the level uniformly between the schedule's
levels at t - 1 and t. That is what lets inference use a different, much shorter
schedule than training.

`condition` is the one place the conditioning image x_up is made, for training, evaluation
and the engine alike: a model is served with the condition it was trained on.

Prediction targets. With y_t = sqrt(gamma) y0 + sqrt(1 - gamma) eps the network f estimates
one of (UNetConfig.prediction):

    eps                                   y0_hat = y_t / sqrt(gamma) - sqrt(1/gamma - 1) f
    y0                                    y0_hat = f
    v = sqrt(gamma) eps - sqrt(1-gamma) y0   y0_hat = sqrt(gamma) y_t - sqrt(1 - gamma) f

Every case is y0_hat = a y_t - b f with per-level scalars (a, b) (`y0_coefficients`), which
is how the samplers and the posterior-step kernels serve all three with one code path. The
loss is the mean |f - target|^p over elements for every target. In terms of the squared y0
error (p = 2; their square roots for p = 1) that weights each level by gamma/(1 - gamma) (eps,
the SNR: huge at low noise, vanishing at high noise), 1 (y0) and 1/(1 - gamma) (v, SNR + 1:
never below the y0 loss, so the high noise levels where sampling from pure noise starts are not
starved).

Diffused space (UNetConfig.residual_scale). SR3 diffuses the image: y0 above is the HR image.
A residual model diffuses d0 = s (y0 - x_up) instead (`to_diffused`), the detail the
upsampled condition lacks, scaled by s so that its spread is not lost in the noise (the
residual of x4 bicubic has a standard deviation of about 0.09 in [-1, 1]; the image, 0.54).
Everything above holds with d0 in place of y0; the sample is y0 = x_up + d0 / s
(`from_diffused`). Its low frequencies come from the condition whatever the network's
error, and the network's errors reach the image divided by s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import resize
import numpy as np

from .config import NOISE_LEVEL_INPUTS, PREDICTIONS
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


def _per_sample(noise_level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Levels of shape (B,) shaped to broadcast over `like` (B, ...), in its dtype."""
    return noise_level.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def q_sample(y0: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y~ = sqrt(gamma) y0 + sqrt(1 - gamma) eps, with noise_level = sqrt(gamma) of shape (B,)."""
    level = _per_sample(noise_level, y0)
    return level * y0 + torch.sqrt(1.0 - level * level) * noise


def _model_config(model: object) -> object | None:
    """`model`'s config, looking through a DistributedDataParallel wrapper's `.module`; None
    for a denoiser without one."""
    return getattr(getattr(model, "module", model), "config", None)


def model_prediction(model: object) -> str:
    """What `model`'s output estimates: its config's `prediction`, eps for a denoiser without one."""
    return getattr(_model_config(model), "prediction", "eps")


def model_residual_scale(model: object) -> float | None:
    """What `model` diffuses: its config's `residual_scale`, None (the image) for a denoiser without one."""
    return getattr(_model_config(model), "residual_scale", None)


def to_diffused(y0: torch.Tensor, x_up: torch.Tensor, residual_scale: float | None) -> torch.Tensor:
    """The variable the reverse process samples for image y0 given condition x_up: y0 itself
    (residual_scale None, SR3), else residual_scale (y0 - x_up)."""
    return y0 if residual_scale is None else (y0 - x_up) * residual_scale


def from_diffused(d0: torch.Tensor, x_up: torch.Tensor, residual_scale: float | None) -> torch.Tensor:
    """The image whose diffused variable is d0 (the inverse of `to_diffused`)."""
    return d0 if residual_scale is None else x_up + d0 / residual_scale


def prediction_target(prediction: str, y0: torch.Tensor, noise: torch.Tensor,
                      noise_level: torch.Tensor) -> torch.Tensor:
    """What a `prediction` network should output for y_t = q_sample(y0, noise_level, noise)."""
    if prediction == "eps":
        return noise
    if prediction == "y0":
        return y0
    if prediction == "v":
        level = _per_sample(noise_level, y0)
        return level * noise - torch.sqrt(1.0 - level * level) * y0
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


def y0_coefficients(prediction: str, noise_level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), float64, such that y0_hat = a y_t - b f for a `prediction` network's output f
    at each sqrt(gamma) in `noise_level` (the table in the module docstring)."""
    level = np.asarray(noise_level, dtype=np.float64)
    gamma = level * level
    if prediction == "eps":
        return 1.0 / level, np.sqrt(1.0 / gamma - 1.0)
    if prediction == "y0":
        return np.zeros_like(level), -np.ones_like(level)
    if prediction == "v":
        return level.copy(), np.sqrt(1.0 - gamma)
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


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
    return pad_to(x_up, padded_length(height, size_multiple), padded_length(width, size_multiple))


def padded_length(length: int, size_multiple: int) -> int:
    """`length` rounded up to a multiple of `size_multiple`: a side of the condition."""
    return length + (-length) % size_multiple


def pad_to(x_up: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x_up (B, C, h, w) grown to at least height x width by replicating its last row and column."""
    pad_h, pad_w = max(0, height - x_up.shape[-2]), max(0, width - x_up.shape[-1])
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
                   level_space: str | None = None, prediction: str | None = None) -> torch.Tensor:
    """Mean of |f(x, y~, level) - target|^p over every element (eq. 6 for eps), p in {1, 2},
    with y~ the diffused variable of y0 (`to_diffused`) at a random level.

    `level_space` and `prediction` default to the model's `config.noise_level_input` and
    `config.prediction` when it has a config (looking through a DistributedDataParallel
    wrapper's `.module`), else to sqrt_gamma and eps. What is diffused is always the model's
    (`model_residual_scale`): a network trained for one space is meaningless in the other.
    """
    if p not in (1, 2):
        raise ValueError(f"diffusion_loss: p must be 1 or 2; got {p!r}")
    if x_up.shape != y0.shape:
        raise ValueError(f"diffusion_loss: x_up {tuple(x_up.shape)} and y0 {tuple(y0.shape)} differ in shape")
    if level_space is None:
        level_space = getattr(_model_config(model), "noise_level_input", "sqrt_gamma")
    if prediction is None:
        prediction = model_prediction(model)
    d0 = to_diffused(y0, x_up, model_residual_scale(model))
    levels = sample_noise_levels(schedule, y0.shape[0], generator=generator, device=y0.device, space=level_space)
    noise = randn(tuple(y0.shape), generator, y0.device, y0.dtype)
    y_noisy = q_sample(d0, levels, noise)
    output = model(x_up, y_noisy, levels)
    return prediction_loss(output, prediction_target(prediction, d0.float(), noise.float(), levels), p)


def prediction_loss(output: torch.Tensor, target: torch.Tensor, p: int) -> torch.Tensor:
    """Mean of |output - target|^p over every element, in float32 (the training and the
    distillation loss)."""
    diff = (output.float() - target).abs()
    return diff.mean() if p == 1 else (diff * diff).mean()
