"""The one bicubic resampler used for conditioning, for making training inputs and for
the consistency metric, so that all three agree on what "bicubic" means.

Images are (B, C, H, W) float tensors. Downsampling is antialiased (a proper low-pass
filter, like Pillow's), upsampling is plain bicubic interpolation (a = -0.75).

A model is served with the condition it was trained on, so the conditioning upsampler is
a model setting (`RESAMPLERS`): `bicubic` is the one above; `pil-bicubic` is Pillow's
bicubic (a = -0.5) on 8-bit images, what the most used open SR3 implementation trains on
(its condition images are 8-bit PNGs), so its converted checkpoints use that.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESAMPLERS = ("bicubic", "pil-bicubic")


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"bicubic_resize: expected (B, C, H, W); got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    downsampling = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    compute = x if x.dtype == torch.float64 else x.float()
    out = F.interpolate(compute, size=size, mode="bicubic", align_corners=False, antialias=downsampling)
    return out.to(x.dtype)


def upsample(x: torch.Tensor, scale: int, resampler: str = "bicubic") -> torch.Tensor:
    """x (B, C, h, w) upsampled by `scale` with one of RESAMPLERS; `pil-bicubic` takes and
    returns values in [0, 1] (8-bit levels in between)."""
    size = (x.shape[-2] * scale, x.shape[-1] * scale)
    if resampler == "bicubic":
        return bicubic_resize(x, size)
    if resampler == "pil-bicubic":
        return pil_bicubic_resize(x, size)
    raise ValueError(f"unknown resampler {resampler!r}; choose one of {RESAMPLERS}")


def pil_bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's bicubic resize of every channel of x in [0, 1], on 8-bit levels, as float in [0, 1]."""
    levels = (x.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = np.empty((*levels.shape[:2], *size), dtype=np.uint8)
    for b in range(levels.shape[0]):
        for c in range(levels.shape[1]):
            out[b, c] = np.asarray(Image.fromarray(levels[b, c]).resize((size[1], size[0]), Image.Resampling.BICUBIC))
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype) / 255.0


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    if x.shape[-2] % scale or x.shape[-1] % scale:
        raise ValueError(f"downsample: size {tuple(x.shape[-2:])} is not divisible by scale {scale}")
    return bicubic_resize(x, (x.shape[-2] // scale, x.shape[-1] // scale))
