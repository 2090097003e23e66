"""posterior_step: one reverse-diffusion update (SR3 eq. 9-11 with the coefficients of eq. 4, or DDIM's).

    y0_hat = y_t * state_coef - pred * output_coef      (clipped to [-1, 1] if clip)
    y_prev = coef1 * y0_hat + coef2 * y_t + sigma * z

z is `noise` when given, else drawn from (seed, step) (see `dispatch` for the seed
contract); with sigma == 0 no noise is used and none is required. y_t, pred and noise
share one shape and device; float32/float16/bfloat16; the output has y_t's dtype and
layout; arithmetic is float32 or better. In this file: the float64 reference, the shared
argument rules, the native backend and the public entry point.
"""

from __future__ import annotations

import torch

from . import dispatch


def posterior_step_ref(y_t: torch.Tensor, pred: torch.Tensor, *, state_coef: float,
                       output_coef: float, coef1: float, coef2: float, sigma: float,
                       noise: torch.Tensor | None = None, clip: bool = True) -> torch.Tensor:
    """Float64 reference of one reverse step with explicit noise (or none)."""
    y = y_t.double()
    y0_hat = y * state_coef - pred.double() * output_coef
    if clip:
        y0_hat = y0_hat.clamp(-1.0, 1.0)
    out = coef1 * y0_hat + coef2 * y
    if noise is not None and sigma != 0.0:
        out = out + sigma * noise.double()
    return out.to(y_t.dtype)


def check_arguments(y_t: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor | None, seed, sigma: float, *,
                    out: torch.Tensor | None = None, op: str = "posterior_step") -> None:
    """The rules every backend shares; a bad argument raises a one-line ValueError."""
    for name, tensor in (("y_t", y_t), ("pred", pred), ("noise", noise), ("out", out)):
        if tensor is None:
            continue
        if tensor.dtype not in dispatch.NATIVE_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; expected float32, float16, bfloat16 or float64")
        if tensor.shape != y_t.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}; it must match y_t's {tuple(y_t.shape)}")
        if tensor.device != y_t.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but y_t is on {y_t.device}")
    if out is not None and out.dtype != y_t.dtype:
        raise ValueError(f"{op}: out has dtype {out.dtype} but y_t has {y_t.dtype}")
    if out is not None and not out.is_contiguous(memory_format=dispatch.dense_format(y_t)):
        raise ValueError(f"{op}: out must be dense in y_t's layout (contiguous or channels_last)")
    if noise is not None and seed is not None:
        raise ValueError(f"{op}: give either noise or seed, not both")
    if sigma != 0.0 and noise is None and seed is None:
        raise ValueError(f"{op}: sigma != 0 needs noise or a seed")
    if isinstance(seed, torch.Tensor) and (seed.dtype != torch.int64 or seed.numel() != 1
                                           or seed.device != y_t.device):
        raise ValueError(f"{op}: a seed tensor must be one int64 on {y_t.device}; got {seed.dtype} of shape "
                         f"{tuple(seed.shape)} on {seed.device}")


def _seeded_normal(like: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    # One stream per (seed, step) so that a step's noise does not depend on the steps before it.
    generator = torch.Generator(device=like.device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _native(y_t, pred, state_coef, output_coef, coef1, coef2, sigma, noise, seed, step, clip):
    compute = torch.float32 if y_t.dtype in dispatch.HALF_DTYPES else y_t.dtype
    y = y_t.to(compute)
    y0_hat = y * state_coef - pred.to(compute) * output_coef
    if clip:
        y0_hat = y0_hat.clamp(-1.0, 1.0)
    out = coef1 * y0_hat + coef2 * y
    if sigma != 0.0:
        z = noise.to(compute) if noise is not None else _seeded_normal(y_t, seed, step)
        out = out + sigma * z
    return out.to(y_t.dtype)


dispatch.register("posterior_step", "native", _native)


def posterior_step(y_t: torch.Tensor, pred: torch.Tensor, *, state_coef: float,
                   output_coef: float, coef1: float, coef2: float, sigma: float,
                   noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None, step: int = 0,
                   clip: bool = True, backend: str = "auto") -> torch.Tensor:
    """One reverse-diffusion update; `seed` is an int or a 0-d int64 tensor on y_t's device."""
    check_arguments(y_t, pred, noise, seed, sigma)
    implementation = dispatch.implementation("posterior_step", backend, y_t)
    if isinstance(seed, torch.Tensor) and not implementation.device_seed:
        seed = int(seed)
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = dispatch.as_int64_seed(seed)
    return implementation.run(y_t, pred, float(state_coef), float(output_coef), float(coef1),
                              float(coef2), float(sigma), noise, seed, int(step), clip)
