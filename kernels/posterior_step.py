"""One reverse-diffusion update (ancestral or DDIM) as a single Triton pass.

Math, elementwise, in float32 whatever the input dtypes:

    y0_hat = y_t * state_coef - pred * output_coef      (clamped to [-1, 1] if clip)
    out    = coef1 * y0_hat + coef2 * y_t + sigma * z

DDIM is the same update with its own coef1, coef2 and sigma. y_t and pred are read once and
out written once; z is either read from a given `noise` tensor or drawn inside the kernel,
so no noise tensor is ever materialised:

    Philox4x32-10 with key = seed and counter = (q mod 2**32, q // 2**32, step mod 2**32,
    step // 2**32), q = i // 4 for element i; its four words become four normals by two
    Box-Muller transforms, and element i takes the (i mod 4)-th. On the GPU the transforms use
    the hardware's approximate log, sin and cos (errors ~1e-6, irrelevant to noise; the
    interpreter has no such functions and uses the precise ones, so values differ slightly).

So z depends only on (seed, step, element index): not on the block size, the grid or the
tensor's size, and two different (seed, step) pairs never share a Philox input. The seed is
an int or a 0-d int64 tensor on the tensors' device, read inside the kernel: a captured CUDA
graph then draws new noise on replay after the tensor is updated in place.

Limits: y_t, pred (and noise, out) of one shape on one device, float32/float16/bfloat16 each;
out has y_t's dtype. Tensors that are not all dense in one layout (contiguous or
channels_last) are copied to one first. Seeds are taken modulo 2**64 as signed int64.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sr3_engine.ops import dispatch
from sr3_engine.ops.posterior_step import check_arguments
# The reference the tests hold the kernel to.
from sr3_engine.ops.posterior_step import posterior_step_ref  # noqa: F401

from .device import INTERPRETED, programs_to_fill, why_not_runnable

# Where z comes from (a constexpr of the kernel).
_NO_NOISE = tl.constexpr(0)
_GIVEN_NOISE = tl.constexpr(1)
_DRAWN_NOISE = tl.constexpr(2)


# ------------------------------------------------------------------------------------ kernel


@triton.jit
def _normal_pair(bits_a, bits_b, FAST_MATH: tl.constexpr):
    """Box-Muller: two independent N(0, 1) values from two uniform 32-bit words."""
    u = tl.maximum(tl.uint_to_uniform_float(bits_a), 1.0e-7)
    # An angle in [-pi, pi), where the hardware sine and cosine are accurate.
    theta = 6.283185307179586 * tl.uint_to_uniform_float(bits_b) - 3.141592653589793
    if FAST_MATH:
        # One SFU instruction each instead of libdevice's ~20-instruction versions: at float32
        # bandwidth the precise ones would make the noise path compute-bound.
        r = tl.sqrt(-2.0 * libdevice.fast_logf(u))
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(u))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit(do_not_specialize=["seed", "step"])
def _posterior_step_kernel(y_ptr, pred_ptr, noise_ptr, out_ptr, seed_ptr, seed, step, numel,
                           state_coef, output_coef, coef1, coef2, sigma,
                           CLIP: tl.constexpr, NOISE: tl.constexpr, SEED_IN_MEMORY: tl.constexpr,
                           FAST_MATH: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = tl.arange(0, BLOCK)
    mask = offsets < numel - start
    y = tl.load(y_ptr + start + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    e = tl.load(pred_ptr + start + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    y0_hat = y * state_coef - e * output_coef
    if CLIP:
        # NaN must survive the clip, or the sampler's non-finite check never sees a bad pred.
        y0_hat = tl.minimum(tl.maximum(y0_hat, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                            propagate_nan=tl.PropagateNan.ALL)
    result = coef1 * y0_hat + coef2 * y
    if NOISE == _GIVEN_NOISE:
        z = tl.load(noise_ptr + start + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
        result += sigma * z.to(tl.float32)
    elif NOISE == _DRAWN_NOISE:
        if SEED_IN_MEMORY:
            key = tl.load(seed_ptr)
        else:
            key = seed.to(tl.int64)
        step = step.to(tl.int64)
        quad = start // 4 + tl.arange(0, BLOCK // 4)
        zero = quad.to(tl.uint32) * 0
        r0, r1, r2, r3 = tl.philox(key, quad.to(tl.uint32), (quad >> 32).to(tl.uint32),
                                   zero + step.to(tl.uint32), zero + (step >> 32).to(tl.uint32))
        n0, n1 = _normal_pair(r0, r1, FAST_MATH)
        n2, n3 = _normal_pair(r2, r3, FAST_MATH)
        # join puts the new axis last: this order lays out n0, n1, n2, n3 for each quad.
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))
        result += sigma * z
    tl.store(out_ptr + start + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- launcher


def _block(numel: int, programs: int) -> int:
    """Elements per program when `programs` fill the device (programs_to_fill)."""
    # ~4 programs per SM balance the tail; 512..4096 elements keep each one worth launching.
    per_program = numel // (2 * programs)
    return min(4096, max(512, triton.next_power_of_2(per_program + 1) // 2))


def _check(y_t, pred, noise, seed, sigma, out) -> None:
    """The shared rules of `ops.posterior_step`, then what this kernel adds: the device."""
    check_arguments(y_t, pred, noise, seed, sigma, out=out, op="posterior_step (triton)")
    for name, tensor in (("y_t", y_t), ("pred", pred), ("noise", noise)):
        if tensor is not None and tensor.dtype not in dispatch.FLOAT_DTYPES:
            raise ValueError(f"posterior_step (triton): {name} has dtype {tensor.dtype}; the kernel takes float32, "
                             "float16, bfloat16")
    reason = why_not_runnable(y_t)
    if reason is not None:
        raise ValueError(f"posterior_step (triton): y_t is on {y_t.device}: {reason}")


def posterior_step_triton(y_t: torch.Tensor, pred: torch.Tensor, *, state_coef: float,
                          output_coef: float, coef1: float, coef2: float, sigma: float,
                          noise: Optional[torch.Tensor] = None, seed=None, step: int = 0, clip: bool = True,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One update; `seed` is an int or a 0-d int64 tensor; `out` (may be y_t itself) receives
    the result, for callers that keep static buffers such as a captured CUDA graph."""
    _check(y_t, pred, noise, seed, sigma, out)
    fmt = dispatch.dense_format(y_t)
    y_t, pred = y_t.contiguous(memory_format=fmt), pred.contiguous(memory_format=fmt)
    if out is None:
        out = torch.empty_like(y_t, memory_format=fmt)
    numel = y_t.numel()
    if numel == 0:
        return out
    if sigma == 0.0:
        mode, noise = _NO_NOISE, None
    elif noise is not None:
        mode, noise = _GIVEN_NOISE, noise.contiguous(memory_format=fmt)
    else:
        mode = _DRAWN_NOISE
    seed_in_memory = isinstance(seed, torch.Tensor)
    block = _block(numel, programs_to_fill(y_t.device))
    with torch.cuda.device(y_t.device) if y_t.is_cuda else contextlib.nullcontext():
        _posterior_step_kernel[(triton.cdiv(numel, block),)](
            y_t, pred, noise, out, seed if seed_in_memory else None,
            0 if seed_in_memory or mode != _DRAWN_NOISE else dispatch.as_int64_seed(seed), int(step), numel,
            float(state_coef), float(output_coef), float(coef1), float(coef2), float(sigma),
            CLIP=bool(clip), NOISE=mode, SEED_IN_MEMORY=seed_in_memory, FAST_MATH=not INTERPRETED, BLOCK=block,
            num_warps=min(8, block // 256),
        )
    return out


# ------------------------------------------------------------------------------ registration


@torch.library.custom_op("sr3_engine::posterior_step", mutates_args=())
def posterior_step_op(y_t: torch.Tensor, pred: torch.Tensor, noise: Optional[torch.Tensor],
                      seed_tensor: Optional[torch.Tensor], seed: Optional[int], step: int,
                      state_coef: float, output_coef: float, coef1: float, coef2: float,
                      sigma: float, clip: bool) -> torch.Tensor:
    """The kernel as an opaque op for torch.compile and CUDA graph capture; the seed is either
    `seed_tensor` (0-d int64, read on the device) or the int `seed`."""
    return posterior_step_triton(
        y_t, pred, state_coef=state_coef, output_coef=output_coef, coef1=coef1,
        coef2=coef2, sigma=sigma, noise=noise, seed=seed_tensor if seed_tensor is not None else seed,
        step=step, clip=clip,
    )


@posterior_step_op.register_fake
def _(y_t, pred, noise, seed_tensor, seed, step, state_coef, output_coef, coef1, coef2, sigma, clip):
    return torch.empty_like(y_t, memory_format=dispatch.dense_format(y_t))


def _dispatch(y_t, pred, state_coef, output_coef, coef1, coef2, sigma, noise, seed, step, clip):
    seed_tensor = seed if isinstance(seed, torch.Tensor) else None
    int_seed = None if seed is None or seed_tensor is not None else dispatch.as_int64_seed(seed)
    return posterior_step_op(y_t, pred, noise, seed_tensor, int_seed, step,
                             state_coef, output_coef, coef1, coef2, sigma, clip)


dispatch.register("posterior_step", "triton", _dispatch, why_not_runnable, device_seed=True)
