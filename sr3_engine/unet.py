"""The SR3 U-Net (Saharia et al. 2021, appendix A), training-compatible.

Modules and parameter names follow the most used open SR3 implementation, so its
checkpoints (keys like `downs.1.res_block.block1.block.0.weight`) load with
`load_state_dict` as they are. Every GroupNorm that is followed by SiLU is one
`GroupNormSiLU` module calling `ops.group_norm_silu`, so fused kernels replace it
without touching the model.

Input: the bicubically upsampled low-res image x_up and the noisy target y_t, both
(B, C, H, W) in [-1, 1], concatenated as [x_up, y_t]; the noise level sqrt(gamma) of
shape (B,). Output: the predicted noise eps, (B, C, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import UNetConfig


class GroupNormSiLU(nn.Module):
    """silu(group_norm(x + pre_bias)) through the op dispatcher; `backend` picks the kernel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.backend = "auto"

    def forward(self, x: torch.Tensor, pre_bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps,
                                   pre_bias=pre_bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r}"


class NoiseLevelEncoding(nn.Module):
    """Sinusoidal embedding of a continuous noise level (no learned parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        # float32 at least, float64 for a float64 level (a float64 reference run of the model).
        dtype = torch.promote_types(noise_level.dtype, torch.float32)
        count = self.dim // 2
        step = torch.arange(count, dtype=dtype, device=noise_level.device) / count
        encoding = noise_level.to(dtype).unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
        return torch.cat([torch.sin(encoding), torch.cos(encoding)], dim=-1)


class FeatureWiseAffine(nn.Module):
    """Projects the noise embedding to a per-channel shift, or scale and shift (FiLM)."""

    def __init__(self, emb_dim: int, channels: int, film: bool):
        super().__init__()
        self.film = film
        self.noise_func = nn.Sequential(nn.Linear(emb_dim, channels * (2 if film else 1)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.noise_func(emb)


class Block(nn.Module):
    """GroupNorm -> SiLU -> dropout -> 3x3 conv.

    Index 1 of `block` is an Identity where the reference has its separate Swish: the
    SiLU is fused into index 0, and keeping the slot keeps the conv at `block.3`.
    """

    def __init__(self, dim: int, dim_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            GroupNormSiLU(groups, dim),
            nn.Identity(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Conv2d(dim, dim_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, pre_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.block[0](x, pre_bias)
        return self.block[3](self.block[2](h))


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.film = cfg.film
        self.skip_scale = 1.0 / math.sqrt(2.0) if cfg.skip_rescale else 1.0
        self.noise_func = FeatureWiseAffine(emb_dim, dim_out, cfg.film)
        self.block1 = Block(dim, dim_out, cfg.norm_groups)
        self.block2 = Block(dim_out, dim_out, cfg.norm_groups, cfg.dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        projected = self.noise_func(emb)
        if self.film:
            scale, shift = projected[:, :, None, None].chunk(2, dim=1)
            h = self.block2((1 + scale) * h + shift)
        else:
            # The additive embedding is added inside the norm kernel instead of as a separate pass.
            h = self.block2(h, pre_bias=projected)
        out = h + self.res_conv(x)
        return out * self.skip_scale if self.skip_scale != 1.0 else out


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        # Per head the qkv channels are [q, k, v] consecutively, as in the reference layout.
        qkv = self.qkv(self.norm(x)).reshape(b, heads, 3 * (c // heads), h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.chunk(3, dim=2))
        # Contiguous copies: SDPA's fused kernels want a unit-stride last dimension and copy anyway,
        # and torch.compile (AOTAutograd, torch 2.13) mis-computes SDPA on these transposed views.
        attended = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.out(attended.transpose(-1, -2).reshape(b, c, h, w)) + x


class ResnetBlocWithAttn(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, cfg: UNetConfig, with_attn: bool):
        super().__init__()
        self.res_block = ResnetBlock(dim, dim_out, emb_dim, cfg)
        self.attn = SelfAttention(dim_out, cfg.num_heads, cfg.norm_groups) if with_attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res_block(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SR3UNet(nn.Module):
    """model(x_up, y_t, noise_level) -> eps_hat."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config if config is not None else UNetConfig()
        self.config = cfg
        inner = cfg.inner_channels
        self.noise_level_mlp = nn.Sequential(
            NoiseLevelEncoding(inner), nn.Linear(inner, inner * 4), nn.SiLU(), nn.Linear(inner * 4, inner),
        )

        channels = inner
        skip_channels = [channels]
        resolution = cfg.image_size
        downs: list[nn.Module] = [nn.Conv2d(2 * cfg.channels, inner, 3, padding=1)]
        for level, mult in enumerate(cfg.channel_mults):
            width = inner * mult
            for _ in range(cfg.res_blocks):
                downs.append(ResnetBlocWithAttn(channels, width, inner, cfg, resolution in cfg.attn_resolutions))
                skip_channels.append(width)
                channels = width
            if level != len(cfg.channel_mults) - 1:
                downs.append(Downsample(channels))
                skip_channels.append(channels)
                resolution //= 2
        self.downs = nn.ModuleList(downs)

        self.mid = nn.ModuleList([
            ResnetBlocWithAttn(channels, channels, inner, cfg, with_attn=True),
            ResnetBlocWithAttn(channels, channels, inner, cfg, with_attn=False),
        ])

        ups: list[nn.Module] = []
        for level in reversed(range(len(cfg.channel_mults))):
            width = inner * cfg.channel_mults[level]
            for _ in range(cfg.res_blocks + 1):
                ups.append(ResnetBlocWithAttn(channels + skip_channels.pop(), width, inner, cfg,
                                              resolution in cfg.attn_resolutions))
                channels = width
            if level != 0:
                ups.append(Upsample(channels))
                resolution *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = Block(channels, cfg.channels, cfg.norm_groups)

    def forward(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        multiple = self.config.size_multiple
        if x_up.shape[-2] % multiple or x_up.shape[-1] % multiple:
            raise ValueError(
                f"SR3UNet: height and width must be multiples of {multiple}; got {tuple(x_up.shape[-2:])}"
            )
        level = noise_level.reshape(x_up.shape[0])
        if self.config.noise_level_input == "gamma":
            level = level.to(torch.promote_types(level.dtype, torch.float32)) ** 2
        emb = self.noise_level_mlp[0](level).to(self.noise_level_mlp[1].weight.dtype)
        emb = self.noise_level_mlp[1:](emb)

        x = torch.cat([x_up, y_t], dim=1)
        skips = []
        for layer in self.downs:
            x = layer(x, emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        for layer in self.ups:
            if isinstance(layer, ResnetBlocWithAttn):
                x = layer(torch.cat([x, skips.pop()], dim=1), emb)
            else:
                x = layer(x)
        return self.final_conv(x)


def activation_bytes(cfg: UNetConfig, batch: int, height: int, width: int, itemsize: int) -> int:
    """Memory one inference forward pass holds at its peak, estimated from the layout above:
    every feature map the down path keeps for the up path, plus the working set of the widest
    up-path block (its concatenated input and about three more maps of that size: normalised
    copy, conv outputs, residual). Attention adds no quadratic term: it runs through
    scaled_dot_product_attention, whose fused kernels do not materialise the attention matrix.
    For demo-x4 on the CPU it is within 2% of the measured peak at 512x512; smaller inputs add a
    fixed ~20 MB of library workspace that this does not count."""
    pixels = height * width
    inner = cfg.inner_channels
    last = len(cfg.channel_mults) - 1
    skips = [inner * pixels]
    channels = inner
    for level, mult in enumerate(cfg.channel_mults):
        for _ in range(cfg.res_blocks):
            channels = inner * mult
            skips.append(channels * pixels // 4**level)
        if level != last:
            skips.append(channels * pixels // 4 ** (level + 1))
    kept = sum(skips)
    widest = 0
    for level in reversed(range(len(cfg.channel_mults))):
        for _ in range(cfg.res_blocks + 1):
            widest = max(widest, (channels * pixels // 4**level) + skips.pop())
            channels = inner * cfg.channel_mults[level]
    return batch * (kept + 4 * widest) * itemsize


def set_op_backend(model: nn.Module, backend: str) -> None:
    """Route every fused GroupNorm+SiLU in `model` through the named op backend."""
    if backend not in ("auto",) + ops.OP_BACKENDS:
        raise ValueError(f"unknown op backend {backend!r}; choose one of {('auto',) + ops.OP_BACKENDS}")
    for module in model.modules():
        if isinstance(module, GroupNormSiLU):
            module.backend = backend
