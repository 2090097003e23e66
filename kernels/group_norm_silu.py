"""GroupNorm followed by SiLU, with an optional per-(batch, channel) bias added first, in Triton.

Math, for batch b and group g (channels c of the group, all H*W positions s):

    h[b, c, s] = x[b, c, s] + pre_bias[b, c]
    mean, var  = mean and biased variance of h over the (C/G)*H*W elements of (b, g)
    y[b, c, s] = silu((h - mean) / sqrt(var + eps) * weight[c] + bias[c]),   silu(v) = v * sigmoid(v)

Two launches, each one pass over x:

1. stats (grid: channel block x spatial chunk x batch): reads its chunk once and writes, per
   channel, the mean and M2 (sum of squared deviations) of x over the chunk in float32. Each
   tile is reduced in two passes over registers (the offset d of its mean from the running
   mean, then the squared deviations from its own mean) and merged into the running values
   with Chan's parallel formula
       n = na + nb,  mean = mean_a + d nb/n,  M2 = M2a + M2b + d^2 na nb/n,
   so E[x^2] - mean^2 is never formed, and no sum grows with |mean| (the running mean starts
   at the chunk's first value): float32 holds the statistics even when |mean| >> std.
2. apply (same grid): merges the partials of its channels with the same formula, first over
   the chunks (counts known from the chunk size), then over the channels of each group, with
   pre_bias shifting each channel's mean (adding a constant moves the mean, not M2); then reads
   x once more and writes silu((x - shift[c]) * scale[c] + bias[c]) in x's dtype and layout,
   where shift = mean - pre_bias and scale = weight / sqrt(var + eps).

Splitting H*W into chunks keeps small batches from leaving SMs idle: the plan aims at
channel blocks x chunks x batch >= 2 x the SM count, with at most sqrt(H*W*itemsize/32)
chunks so that the partials each apply program reads stay under ~1/8 of its own traffic.

Layouts: contiguous NCHW (tiles are [channels, spatial], spatial contiguous in memory) and
channels_last (tiles are [spatial, channels], channels contiguous); H and W flatten into one
spatial axis in both. Any other strides are first copied to NCHW.

Limits: x float32, float16 or bfloat16 (weight, bias, pre_bias any float dtype, read as
float32); C divisible by G with C/G <= 4096; C*H*W < 2**31 per sample. The backward pass is
not a kernel here: `sr3_engine.ops.group_norm_silu_backward` (shared with the cpp backend)
recomputes the statistics and runs PyTorch's own float32 GroupNorm and SiLU backward kernels.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from sr3_engine.ops import dispatch
from sr3_engine.ops.group_norm_silu import check_arguments, register_autograd
# The reference the tests hold the kernels to.
from sr3_engine.ops.group_norm_silu import group_norm_silu_ref  # noqa: F401

from .device import programs_to_fill, why_not_runnable

_TILE = 4096                 # elements per tile: 16 per thread at 8 warps
_ROW_CHANNELS = 128          # channels_last: widest channel block (256 contiguous bytes in bf16)
_MAX_GROUP_CHANNELS = 4096   # a whole group's channels must fit in one tile row/column


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _block_channels(group_block, num_channels, CPG: tl.constexpr, CPG_P2: tl.constexpr, GB: tl.constexpr):
    """Channel index of each of the GB * CPG_P2 columns of a group block, and which are real."""
    j = tl.arange(0, GB * CPG_P2)
    if CPG == CPG_P2:
        # Written as an affine function of arange so the compiler sees contiguous channels.
        c = group_block * (GB * CPG) + j
        return c, c < num_channels
    else:
        within = j % CPG_P2
        c = (group_block * GB + j // CPG_P2) * CPG + within
        return c, (within < CPG) & (c < num_channels)


@triton.jit
def _tile(c, c_ok, s0, s_end, stride_outer, BLOCK_S: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    """Offsets and mask of the tile of channels c and positions s0 .. s0 + BLOCK_S (< s_end)."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_ok = s < s_end
    if CHANNELS_INNER:
        return s[:, None] * stride_outer + c[None, :], s_ok[:, None] & c_ok[None, :]
    else:
        return c[:, None] * stride_outer + s[None, :], c_ok[:, None] & s_ok[None, :]


@triton.jit
def _first_values(x_ptr, c, c_ok, s, stride_outer, CHANNELS_INNER: tl.constexpr):
    """Each channel's value at spatial position s."""
    if CHANNELS_INNER:
        return tl.load(x_ptr + s * stride_outer + c, mask=c_ok, other=0.0)
    else:
        return tl.load(x_ptr + c * stride_outer + s, mask=c_ok, other=0.0)


@triton.jit
def _sum_over_space(v, CHANNELS_INNER: tl.constexpr):
    if CHANNELS_INNER:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(v, axis=1)


@triton.jit
def _per_channel(v, CHANNELS_INNER: tl.constexpr):
    if CHANNELS_INNER:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, num_channels, hw, stride_b, stride_outer, chunk, num_chunks,
                  CPG: tl.constexpr, CPG_P2: tl.constexpr, GB: tl.constexpr, BLOCK_S: tl.constexpr,
                  TILES: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    group_block = tl.program_id(0)
    chunk_id = tl.program_id(1)
    b = tl.program_id(2)
    c, c_ok = _block_channels(group_block, num_channels, CPG, CPG_P2, GB)
    x_ptr += b.to(tl.int64) * stride_b
    s_begin = chunk_id * chunk
    s_end = tl.minimum(s_begin + chunk, hw)

    # Sums are taken of x - mean (the running mean, seeded with the chunk's first value) so
    # that they stay small and exact even when |mean| >> std.
    count = tl.zeros([], tl.float32)
    mean = _first_values(x_ptr, c, c_ok, s_begin, stride_outer, CHANNELS_INNER).to(tl.float32)
    m2 = tl.zeros([GB * CPG_P2], tl.float32)
    # TILES tiles per chunk, a constant (see the launcher); the last chunk may end in empty
    # tiles (n = 0), which merge as no-ops.
    offsets, mask = _tile(c, c_ok, s_begin, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
    upcoming = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
    for t in range(0, TILES):
        s0 = s_begin + t * BLOCK_S
        _, mask = _tile(c, c_ok, s0, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
        v = upcoming.to(tl.float32)
        # Load the next tile (masked off past the chunk) before reducing this one, so that
        # every program keeps a load in flight through its reductions.
        offsets, next_mask = _tile(c, c_ok, s0 + BLOCK_S, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
        upcoming = tl.load(x_ptr + offsets, mask=next_mask, other=0.0, eviction_policy="evict_last")
        n = tl.maximum(tl.minimum(s_end - s0, BLOCK_S), 0).to(tl.float32)
        centred = tl.where(mask, v - _per_channel(mean, CHANNELS_INNER), 0.0)
        delta = _sum_over_space(centred, CHANNELS_INNER) / tl.maximum(n, 1.0)  # tile mean - mean
        deviation = tl.where(mask, centred - _per_channel(delta, CHANNELS_INNER), 0.0)
        tile_m2 = _sum_over_space(deviation * deviation, CHANNELS_INNER)
        total = count + n
        mean += delta * (n / total)
        m2 += tile_m2 + delta * delta * (count * n / total)
        count = total

    out = (b * num_chunks + chunk_id) * num_channels + c
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(m2_ptr + out, m2, mask=c_ok)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, m2_ptr, weight_ptr, bias_ptr, pre_bias_ptr,
                  num_channels, hw, stride_b, stride_outer, chunk, num_chunks, eps,
                  CPG: tl.constexpr, CPG_P2: tl.constexpr, GB: tl.constexpr, BLOCK_S: tl.constexpr,
                  TILES: tl.constexpr, CHUNKS_P2: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_PRE_BIAS: tl.constexpr):
    # Walk the grid backwards: the chunks the stats pass read last are the ones still in L2.
    group_block = tl.num_programs(0) - 1 - tl.program_id(0)
    chunk_id = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.num_programs(2) - 1 - tl.program_id(2)
    c, c_ok = _block_channels(group_block, num_channels, CPG, CPG_P2, GB)
    # Not hw.to(): compiled Triton passes an int argument equal to 1 (a 1x1 feature map) as a
    # Python constant, which has no .to(); multiplying works for both.
    hw_f = hw * 1.0

    # Each channel over all of H*W: merge the chunks' partials (padding chunks have n = 0).
    k = tl.arange(0, CHUNKS_P2)
    part_ok = (k < num_chunks)[:, None] & c_ok[None, :]
    part = (b * num_chunks + k)[:, None] * num_channels + c[None, :]
    part_mean = tl.load(mean_ptr + part, mask=part_ok, other=0.0)
    part_m2 = tl.load(m2_ptr + part, mask=part_ok, other=0.0)
    part_n = tl.minimum(tl.maximum(hw - k * chunk, 0), chunk).to(tl.float32)[:, None]
    # Means are averaged as offsets from the first one, which keeps the sums small (as in stats).
    first = tl.sum(tl.where(k[:, None] == 0, part_mean, 0.0), axis=0)
    channel_mean = first + tl.sum(tl.where(part_ok, part_mean - first[None, :], 0.0) * part_n, axis=0) / hw_f
    spread = tl.where(part_ok, part_mean - channel_mean[None, :], 0.0)
    channel_m2 = tl.sum(part_m2 + part_n * spread * spread, axis=0)
    if HAS_PRE_BIAS:
        pre_bias = tl.load(pre_bias_ptr + b * num_channels + c, mask=c_ok, other=0.0).to(tl.float32)
        channel_mean += pre_bias

    # Each group: merge its channels, which all have H*W elements.
    grouped_ok = tl.reshape(c_ok, (GB, CPG_P2))
    grouped_mean = tl.reshape(channel_mean, (GB, CPG_P2))
    first = tl.sum(tl.where(tl.arange(0, CPG_P2)[None, :] == 0, grouped_mean, 0.0), axis=1)
    group_mean = first + tl.sum(tl.where(grouped_ok, grouped_mean - first[:, None], 0.0), axis=1) / CPG
    spread = tl.where(grouped_ok, grouped_mean - group_mean[:, None], 0.0)
    group_m2 = tl.sum(tl.reshape(channel_m2, (GB, CPG_P2)), axis=1) + hw_f * tl.sum(spread * spread, axis=1)
    group_rstd = tl.rsqrt(group_m2 / (CPG * hw_f) + eps)
    shift = tl.reshape(tl.broadcast_to(group_mean[:, None], (GB, CPG_P2)), (GB * CPG_P2,))
    scale = tl.reshape(tl.broadcast_to(group_rstd[:, None], (GB, CPG_P2)), (GB * CPG_P2,))
    if HAS_PRE_BIAS:
        shift -= pre_bias
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([GB * CPG_P2], tl.float32)
    shift = _per_channel(shift, CHANNELS_INNER)
    scale = _per_channel(scale, CHANNELS_INNER)
    beta = _per_channel(beta, CHANNELS_INNER)

    x_ptr += b.to(tl.int64) * stride_b
    y_ptr += b.to(tl.int64) * stride_b
    s_begin = chunk_id * chunk
    s_end = tl.minimum(s_begin + chunk, hw)
    offsets, mask = _tile(c, c_ok, s_begin, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
    upcoming = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
    for t in range(0, TILES):
        s0 = s_begin + t * BLOCK_S
        offsets, mask = _tile(c, c_ok, s0, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
        v = upcoming.to(tl.float32)
        # The next tile's load goes out before this one is computed and stored (as in stats).
        next_offsets, next_mask = _tile(c, c_ok, s0 + BLOCK_S, s_end, stride_outer, BLOCK_S, CHANNELS_INNER)
        upcoming = tl.load(x_ptr + next_offsets, mask=next_mask, other=0.0, eviction_policy="evict_first")
        h = (v - shift) * scale + beta
        # Approximate division (2 ulp) is one reciprocal and a multiply where IEEE division takes
        # ~10 instructions: at bf16 rates the arithmetic must stay under the memory time.
        out = tl.fdiv(h, 1.0 + tl.exp(-h), ieee_rounding=False)
        tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class Plan:
    """How one call is cut into programs (see the module docstring)."""

    channels_inner: bool      # channels_last tiles ([spatial, channels]) rather than NCHW ones
    groups_per_block: int     # GB, a power of two
    block_s: int              # spatial positions per tile
    chunk: int                # spatial positions per program
    num_chunks: int
    num_group_blocks: int
    num_warps: int


def plan(batch: int, channels: int, groups: int, hw: int, channels_inner: bool, element_size: int,
         programs_wanted: int, *, split: Optional[int] = None, tile: int = _TILE) -> Plan:
    """Tile shape and grid for one call. `split` forces the number of chunks per group (as far
    as H*W allows) and `tile` the elements per tile; both exist so tests can reach every path."""
    cpg_p2 = triton.next_power_of_2(channels // groups)
    groups_p2 = triton.next_power_of_2(groups)
    hw_p2 = triton.next_power_of_2(hw)
    # More chunks mean more partials for each apply program to read; see the module docstring.
    chunk_bound = max(1, math.isqrt(hw * element_size // 32))

    def spatial_block(gb: int) -> int:
        return min(hw_p2, max(1, tile // (gb * cpg_p2)))

    if channels_inner:
        # Narrow the channel block while that buys programs, keeping rows >= 16 contiguous bytes.
        narrowest = max(cpg_p2, 16 // element_size)
        gb = min(groups_p2, max(1, _ROW_CHANNELS // cpg_p2))
        while (gb > 1 and gb * cpg_p2 // 2 >= narrowest and
               batch * triton.cdiv(groups, gb) * min(chunk_bound, triton.cdiv(hw, spatial_block(gb)))
               < programs_wanted):
            gb //= 2
        block_s = spatial_block(gb)
    else:
        block_s = min(hw_p2, max(1, tile // cpg_p2))
        gb = min(groups_p2, max(1, tile // (block_s * cpg_p2)))
    num_group_blocks = triton.cdiv(groups, gb)

    if split is None:
        tiles = triton.cdiv(hw, block_s)
        chunks = min(triton.cdiv(programs_wanted, batch * num_group_blocks), chunk_bound, tiles)
        # Whole tiles per chunk keep every chunk's first tile aligned like the tensor.
        chunk = triton.cdiv(tiles, max(1, chunks)) * block_s
    else:
        chunk = triton.cdiv(hw, max(1, split))
        block_s = min(block_s, triton.next_power_of_2(chunk))
    return Plan(channels_inner, gb, block_s, chunk, triton.cdiv(hw, chunk), num_group_blocks,
                num_warps=min(8, max(1, block_s * gb * cpg_p2 // 512)))


def _check(x, num_groups, weight, bias, pre_bias) -> None:
    """The shared rules of `ops.group_norm_silu`, then what these kernels add: the device and their limits."""
    check_arguments(x, num_groups, weight, bias, pre_bias, op="group_norm_silu (triton)")
    if x.dtype not in dispatch.FLOAT_DTYPES:
        raise ValueError(f"group_norm_silu (triton): x has dtype {x.dtype}; the kernels take float32, float16, bfloat16")
    reason = why_not_runnable(x)
    if reason is not None:
        raise ValueError(f"group_norm_silu (triton): x is on {x.device}: {reason}")
    channels, height, width = x.shape[1:]
    if channels // num_groups > _MAX_GROUP_CHANNELS:
        raise ValueError(f"group_norm_silu (triton): {channels // num_groups} channels per group exceed "
                         f"the kernel limit of {_MAX_GROUP_CHANNELS}")
    if channels * height * width >= 2**31:
        raise ValueError(f"group_norm_silu (triton): C*H*W = {channels * height * width} elements per sample "
                         "exceed the kernel limit of 2**31 - 1")


def group_norm_silu_triton(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                           pre_bias: Optional[torch.Tensor] = None, *, split: Optional[int] = None,
                           tile: int = _TILE) -> torch.Tensor:
    """Run the two kernels (no autograd: use `ops.group_norm_silu` or `group_norm_silu_op`)."""
    _check(x, num_groups, weight, bias, pre_bias)
    fmt = dispatch.dense_format(x)
    x = x.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    batch, channels, height, width = x.shape
    hw = height * width
    if y.numel() == 0:
        return y
    p = plan(batch, channels, num_groups, hw, fmt == torch.channels_last or hw == 1, x.element_size(),
             programs_to_fill(x.device), split=split, tile=tile)
    partials = torch.empty((2, batch, p.num_chunks, channels), device=x.device, dtype=torch.float32)
    grid = (p.num_group_blocks, p.num_chunks, batch)
    cpg = channels // num_groups
    # The trip count is a constexpr: the compiler sees a fixed loop per layer shape, and Triton
    # 3.6's interpreter cannot run a loop with a run-time bound under NumPy >= 2.4.
    common = dict(CPG=cpg, CPG_P2=triton.next_power_of_2(cpg), GB=p.groups_per_block, BLOCK_S=p.block_s,
                  TILES=triton.cdiv(p.chunk, p.block_s), CHANNELS_INNER=p.channels_inner, num_warps=p.num_warps)
    strides = (channels * hw, channels if p.channels_inner else hw)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _stats_kernel[grid](x, partials[0], partials[1], channels, hw, *strides, p.chunk, p.num_chunks, **common)
        _apply_kernel[grid](
            x, y, partials[0], partials[1],
            None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(),
            None if pre_bias is None else pre_bias.contiguous(),
            channels, hw, *strides, p.chunk, p.num_chunks, float(eps),
            CHUNKS_P2=triton.next_power_of_2(p.num_chunks), HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_PRE_BIAS=pre_bias is not None, **common,
        )
    return y


# ------------------------------------------------------------------------------ registration


@torch.library.custom_op("sr3_engine::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The kernels as an opaque op, so torch.compile and CUDA graph capture take them whole."""
    return group_norm_silu_triton(x, num_groups, weight, bias, eps, pre_bias)


@group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, pre_bias, eps):
    return torch.empty_like(x, memory_format=dispatch.dense_format(x))


register_autograd(group_norm_silu_op)


def _dispatch(x, num_groups, weight, bias, eps, pre_bias):
    return group_norm_silu_op(x, num_groups, weight, bias, pre_bias, float(eps))


dispatch.register("group_norm_silu", "triton", _dispatch, why_not_runnable)
