"""The one bicubic resampler used for conditioning, for making training inputs and for
the consistency metric, so that all three agree on what "bicubic" means.

Images are (B, C, H, W) float tensors. Downsampling is antialiased (a proper low-pass
filter, like Pillow's), upsampling is plain bicubic interpolation (a = -0.75).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"bicubic_resize: expected (B, C, H, W); got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    downsampling = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    compute = x if x.dtype == torch.float64 else x.float()
    out = F.interpolate(compute, size=size, mode="bicubic", align_corners=False, antialias=downsampling)
    return out.to(x.dtype)


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    return bicubic_resize(x, (x.shape[-2] * scale, x.shape[-1] * scale))


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    if x.shape[-2] % scale or x.shape[-1] % scale:
        raise ValueError(f"downsample: size {tuple(x.shape[-2:])} is not divisible by scale {scale}")
    return bicubic_resize(x, (x.shape[-2] // scale, x.shape[-1] // scale))
