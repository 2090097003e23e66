"""Image quality metrics for super-resolution: PSNR, SSIM and SR3's consistency.

PSNR and SSIM are reported the way SR papers report them: on the 8-bit RGB images a
user would save, so both inputs are rescaled to [0, 255] and rounded to integer levels
first. Reporting on unrounded floats would give numbers nobody can reproduce from the
saved PNGs. SSIM is scikit-image's implementation (not a hand-written one) with the
parameters of Wang et al. 2004, so values match the reference everyone cites.

Consistency (SR3 paper, section 4) asks whether the output explains the input: the
super-resolved image, downsampled with the very bicubic kernel that made the training
inputs (`resize.downsample`), should give back the low-res image. It is an MSE on
images in [0, 1], unrounded, because it measures the model, not a saved file; the paper
quotes it in units of 1e-5.

All functions take (B, 3, H, W) or (3, H, W) tensors and return one value per image,
float64, shape (B,) (or a 0-d tensor for a single unbatched image).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from . import resize

EIGHT_BIT_MAX = 255.0
# Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5 and population statistics.
SSIM_OPTIONS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
SSIM_MIN_SIZE = 11


def _batched(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() not in (3, 4):
        raise ValueError(f"{name}: expected (B, C, H, W) or (C, H, W); got shape {tuple(a.shape)}")
    single = a.dim() == 3
    return (a[None], b[None], single) if single else (a, b, single)


def _unbatch(values: torch.Tensor, single: bool) -> torch.Tensor:
    return values[0] if single else values


def to_8bit(x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Values in [0, data_range] as float64 integer levels in [0, 255]."""
    if data_range <= 0:
        raise ValueError(f"to_8bit: data_range must be positive; got {data_range}")
    return (x.detach().double().cpu() * (EIGHT_BIT_MAX / data_range)).round().clamp(0.0, EIGHT_BIT_MAX)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images with values in [0, data_range], computed
    on 8-bit RGB in [0, 255] (both rounded to integer levels). Identical images give inf."""
    a, b, single = _batched("psnr", a, b)
    mse = ((to_8bit(a, data_range) - to_8bit(b, data_range)) ** 2).flatten(1).mean(dim=1)
    return _unbatch(10.0 * torch.log10(EIGHT_BIT_MAX**2 / mse), single)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (scikit-image, Gaussian window sigma 1.5, Wang et al. 2004) of
    images with values in [0, data_range], computed on 8-bit RGB in [0, 255] with
    data_range=255 and the channel axis given explicitly. Images need H, W >= 11."""
    a, b, single = _batched("ssim", a, b)
    if min(a.shape[-2:]) < SSIM_MIN_SIZE:
        raise ValueError(f"ssim: images must be at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} (the Gaussian "
                         f"window); got {tuple(a.shape[-2:])}")
    a8 = to_8bit(a, data_range).permute(0, 2, 3, 1).numpy()
    b8 = to_8bit(b, data_range).permute(0, 2, 3, 1).numpy()
    values = [structural_similarity(x, y, channel_axis=-1, data_range=EIGHT_BIT_MAX, **SSIM_OPTIONS)
              for x, y in zip(a8, b8)]
    return _unbatch(torch.tensor(np.asarray(values, dtype=np.float64)), single)


def consistency(sr: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """MSE between `sr` downsampled by `scale` with `resize.downsample` (antialiased bicubic)
    and `lr`, both with values in [0, 1], unrounded. 0 means the output reproduces its input."""
    if sr.dim() != lr.dim() or sr.dim() not in (3, 4):
        raise ValueError(f"consistency: expected sr and lr both (B, C, H, W) or (C, H, W); got "
                         f"{tuple(sr.shape)} and {tuple(lr.shape)}")
    single = sr.dim() == 3
    sr4, lr4 = (sr[None], lr[None]) if single else (sr, lr)
    expected = (lr4.shape[-2] * scale, lr4.shape[-1] * scale)
    if tuple(sr4.shape[-2:]) != expected or sr4.shape[:2] != lr4.shape[:2]:
        raise ValueError(f"consistency: sr {tuple(sr.shape)} is not lr {tuple(lr.shape)} upscaled by {scale}")
    down = resize.downsample(sr4.detach().double().cpu(), scale)
    mse = ((down - lr4.detach().double().cpu()) ** 2).flatten(1).mean(dim=1)
    return _unbatch(mse, single)


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean |5-point Laplacian| over the interior pixels and channels of images (B, C, H, W)
    (or (C, H, W)) in [0, 1], float64: how much fine detail an image holds."""
    if x.dim() not in (3, 4) or min(x.shape[-2:]) < 3:
        raise ValueError(f"laplacian_energy: expected (B, C, H, W) or (C, H, W) with H, W >= 3; got {tuple(x.shape)}")
    single = x.dim() == 3
    x4 = (x[None] if single else x).detach().double().cpu()
    centre = x4[..., 1:-1, 1:-1]
    lap = x4[..., :-2, 1:-1] + x4[..., 2:, 1:-1] + x4[..., 1:-1, :-2] + x4[..., 1:-1, 2:] - 4.0 * centre
    return _unbatch(lap.abs().flatten(1).mean(dim=1), single)


def detail(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """laplacian_energy(sr) / laplacian_energy(hr) per image: 1 means as much fine detail as
    the real image; bicubic upsampling is well under 1, noise above it."""
    if sr.shape != hr.shape:
        raise ValueError(f"detail: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
    return laplacian_energy(sr) / laplacian_energy(hr).clamp_min(1e-12)
