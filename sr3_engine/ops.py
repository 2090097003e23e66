"""The one dispatch point for each fused op.

Backends: `native` (plain PyTorch, always available), `triton` and `cpp` (fused
kernels, present only when built). A backend named by the caller is used or the call
raises with the reason it cannot run; `auto` takes the fastest one whose predicates
hold (device, dtype, import succeeded) and never fails while `native` can run.

Each op also has a `*_ref` eager reference that computes in float64 straight from the
equations; tests compare every backend against it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

OP_BACKENDS = ("native", "triton", "cpp")
_AUTO_ORDER = {"cuda": ("triton", "cpp", "native"), "cpu": ("cpp", "native")}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, *_HALF_DTYPES)

# op name -> backend name -> implementation; fused backends register themselves here.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {"group_norm_silu": {}, "posterior_step": {}}
# backend name -> predicate(tensor) returning None when it can run, else the reason it cannot.
_PREDICATES: dict[str, Callable[[torch.Tensor], str | None]] = {}
_UNAVAILABLE_REASONS: dict[str, str] = {
    "triton": "the Triton kernels are not part of this build",
    "cpp": "the C++ extension sr3_engine._C is not part of this build",
}
_logged_auto_choices: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, implementation: Callable,
             predicate: Callable[[torch.Tensor], str | None] | None = None) -> None:
    """Make `implementation` the `backend` version of `op`."""
    if op not in _IMPLEMENTATIONS or backend not in OP_BACKENDS:
        raise ValueError(f"register: unknown op {op!r} or backend {backend!r}")
    _IMPLEMENTATIONS[op][backend] = implementation
    if predicate is not None:
        _PREDICATES[backend] = predicate


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why a fused backend could not be loaded, for the error a caller will see."""
    _UNAVAILABLE_REASONS[backend] = reason


def why_unavailable(op: str, backend: str, x: torch.Tensor) -> str | None:
    """None when `backend` can run `op` on tensors like `x`; otherwise the reason."""
    if backend not in OP_BACKENDS:
        return f"unknown backend {backend!r}; choose one of {('auto',) + OP_BACKENDS}"
    if backend not in _IMPLEMENTATIONS[op]:
        return _UNAVAILABLE_REASONS.get(backend, f"{op} has no {backend} implementation")
    if x.dtype not in _FLOAT_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16)"
    predicate = _PREDICATES.get(backend)
    return predicate(x) if predicate is not None else None


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    if backend != "auto":
        reason = why_unavailable(op, backend, x)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run on {x.device.type} {x.dtype}: {reason}")
        return backend
    for candidate in _AUTO_ORDER.get(x.device.type, ("native",)):
        if why_unavailable(op, candidate, x) is None:
            key = (op, x.device.type, candidate)
            # Logging inside a torch.compile trace is a graph break; the eager call logs it.
            if key not in _logged_auto_choices and not torch.compiler.is_compiling():
                _logged_auto_choices.add(key)
                logger.info("%s on %s: auto picked the %s backend", op, x.device.type, candidate)
            return candidate
    raise RuntimeError(f"{op}: no backend can run on {x.device.type} {x.dtype}")


def available_backends(op: str, x: torch.Tensor) -> list[str]:
    return [b for b in OP_BACKENDS if why_unavailable(op, b, x) is None]


# ---------------------------------------------------------------------------------------
# group_norm_silu: y = silu(GroupNorm(x + pre_bias[:, :, None, None]) * weight + bias)
# ---------------------------------------------------------------------------------------


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float = 1e-5, *,
                        pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference: two-pass mean and biased variance per (batch, group)."""
    b, c = x.shape[:2]
    h = x.double()
    if pre_bias is not None:
        h = h + pre_bias.double().view(b, c, *([1] * (x.dim() - 2)))
    grouped = h.reshape(b, num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
    normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    affine_shape = (1, c, *([1] * (x.dim() - 2)))
    if weight is not None:
        normed = normed * weight.double().view(affine_shape)
    if bias is not None:
        normed = normed + bias.double().view(affine_shape)
    return (normed * torch.sigmoid(normed)).to(x.dtype)


def _group_norm_silu_native(x, num_groups, weight, bias, eps, pre_bias):
    if pre_bias is not None:
        x = x + pre_bias.view(*pre_bias.shape, 1, 1).to(x.dtype)
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


_IMPLEMENTATIONS["group_norm_silu"]["native"] = _group_norm_silu_native


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                    pre_bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm followed by SiLU, optionally adding a per-(batch, channel) `pre_bias` first.

    x is (B, C, H, W) in NCHW or channels_last; statistics are always float32 or better.
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm_silu: expected a 4-D (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels are not divisible by num_groups={num_groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (channels,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({channels},); got {tuple(param.shape)}")
    if pre_bias is not None and pre_bias.shape != (x.shape[0], channels):
        raise ValueError(
            f"group_norm_silu: pre_bias must have shape ({x.shape[0]}, {channels}); got {tuple(pre_bias.shape)}"
        )
    chosen = resolve_backend("group_norm_silu", backend, x)
    return _IMPLEMENTATIONS["group_norm_silu"][chosen](x, num_groups, weight, bias, eps, pre_bias)


def group_norm_silu_backward(grad: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float, pre_bias: torch.Tensor | None,
                             needs: tuple[bool, bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients (x, weight, bias, pre_bias) of group_norm_silu, for the fused backends' autograd.

    Analytic and in float32 whatever the input dtype, recomputing the statistics from the
    inputs instead of saving them; `needs` says which of the four gradients to compute.
    """
    batch, channels = x.shape[:2]
    per_channel = (1, channels, 1, 1)
    h = x.float()
    if pre_bias is not None:
        h = h + pre_bias.float().view(batch, channels, 1, 1)
    grouped = h.reshape(batch, num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    x_hat = (grouped - mean) * rstd
    scale = weight.float().view(per_channel) if weight is not None else 1.0
    pre_act = x_hat.view(h.shape) * scale
    if bias is not None:
        pre_act = pre_act + bias.float().view(per_channel)
    sig = torch.sigmoid(pre_act)
    d_pre_act = grad.float() * sig * (1.0 + pre_act * (1.0 - sig))

    d_x_hat = (d_pre_act * scale).reshape(grouped.shape)
    d_h = rstd * (d_x_hat - d_x_hat.mean(-1, keepdim=True)
                  - x_hat * (d_x_hat * x_hat).mean(-1, keepdim=True))
    d_h = d_h.view(h.shape)
    d_x = d_h.to(x.dtype) if needs[0] else None
    d_weight = (d_pre_act * x_hat.view(h.shape)).sum((0, 2, 3)).to(weight.dtype) if needs[1] else None
    d_bias = d_pre_act.sum((0, 2, 3)).to(bias.dtype) if needs[2] else None
    d_pre_bias = d_h.sum((2, 3)).to(pre_bias.dtype) if needs[3] else None
    return d_x, d_weight, d_bias, d_pre_bias


def _group_norm_silu_op_setup(ctx, inputs, output):
    x, num_groups, weight, bias, pre_bias, eps = inputs
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.save_for_backward(x, weight, bias, pre_bias)


def _group_norm_silu_op_backward(ctx, grad):
    x, weight, bias, pre_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad  # positions in the op's schema: x, num_groups, weight, bias, pre_bias, eps
    d_x, d_weight, d_bias, d_pre_bias = group_norm_silu_backward(
        grad, x, ctx.num_groups, weight, bias, ctx.eps, pre_bias, (needs[0], needs[2], needs[3], needs[4]))
    return d_x, None, d_weight, d_bias, d_pre_bias, None


def register_group_norm_silu_autograd(op) -> None:
    """Autograd for a fused backend's group_norm_silu custom op (a CustomOpDef or its qualified
    name), whose schema must be (x, num_groups, weight, bias, pre_bias, eps)."""
    torch.library.register_autograd(op, _group_norm_silu_op_backward, setup_context=_group_norm_silu_op_setup)


# ---------------------------------------------------------------------------------------
# posterior_step (eq. 9-11 with the coefficients of eq. 4, or DDIM's):
#   y0_hat = y_t * sqrt_recip_gamma - eps * sqrt_recipm1_gamma   (clipped to [-1, 1] if clip)
#   y_prev = coef1 * y0_hat + coef2 * y_t + sigma * z
# ---------------------------------------------------------------------------------------


def posterior_step_ref(y_t: torch.Tensor, eps: torch.Tensor, *, sqrt_recip_gamma: float,
                       sqrt_recipm1_gamma: float, coef1: float, coef2: float, sigma: float,
                       noise: torch.Tensor | None = None, clip: bool = True) -> torch.Tensor:
    """Float64 reference of one reverse step with explicit noise (or none)."""
    y = y_t.double()
    y0_hat = y * sqrt_recip_gamma - eps.double() * sqrt_recipm1_gamma
    if clip:
        y0_hat = y0_hat.clamp(-1.0, 1.0)
    out = coef1 * y0_hat + coef2 * y
    if noise is not None and sigma != 0.0:
        out = out + sigma * noise.double()
    return out.to(y_t.dtype)


def _seeded_normal(like: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    # One stream per (seed, step) so that a step's noise does not depend on the steps before it.
    generator = torch.Generator(device=like.device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _posterior_step_native(y_t, eps, sqrt_recip_gamma, sqrt_recipm1_gamma, coef1, coef2, sigma,
                           noise, seed, step, clip):
    compute = torch.float32 if y_t.dtype in _HALF_DTYPES else y_t.dtype
    y = y_t.to(compute)
    y0_hat = y * sqrt_recip_gamma - eps.to(compute) * sqrt_recipm1_gamma
    if clip:
        y0_hat = y0_hat.clamp(-1.0, 1.0)
    out = coef1 * y0_hat + coef2 * y
    if sigma != 0.0:
        z = noise.to(compute) if noise is not None else _seeded_normal(y_t, seed, step)
        out = out + sigma * z
    return out.to(y_t.dtype)


_IMPLEMENTATIONS["posterior_step"]["native"] = _posterior_step_native


def posterior_step(y_t: torch.Tensor, eps: torch.Tensor, *, sqrt_recip_gamma: float,
                   sqrt_recipm1_gamma: float, coef1: float, coef2: float, sigma: float,
                   noise: torch.Tensor | None = None, seed: int | None = None, step: int = 0,
                   clip: bool = True, backend: str = "auto") -> torch.Tensor:
    """One reverse-diffusion update. The noise z is `noise` when given, else drawn from
    (seed, step); with sigma == 0 no noise is used and neither is required."""
    if y_t.shape != eps.shape:
        raise ValueError(f"posterior_step: y_t {tuple(y_t.shape)} and eps {tuple(eps.shape)} differ in shape")
    if y_t.device != eps.device:
        raise ValueError(f"posterior_step: y_t is on {y_t.device} but eps is on {eps.device}")
    if noise is not None and noise.shape != y_t.shape:
        raise ValueError(f"posterior_step: noise {tuple(noise.shape)} must match y_t {tuple(y_t.shape)}")
    if noise is not None and seed is not None:
        raise ValueError("posterior_step: give either noise or seed, not both")
    if sigma != 0.0 and noise is None and seed is None:
        raise ValueError("posterior_step: sigma != 0 needs noise or a seed")
    chosen = resolve_backend("posterior_step", backend, y_t)
    return _IMPLEMENTATIONS["posterior_step"][chosen](
        y_t, eps, float(sqrt_recip_gamma), float(sqrt_recipm1_gamma), float(coef1), float(coef2),
        float(sigma), noise, seed, int(step), clip,
    )


# ---------------------------------------------------------------------------------------
# The Triton backend registers itself when its kernels import (package sr3_engine.kernels,
# built from kernels/); without Triton the reason is kept for the errors callers see.
# ---------------------------------------------------------------------------------------


def _load_triton_kernels() -> None:
    try:
        importlib.import_module(f"{__package__}.kernels")
    except ImportError as error:
        mark_unavailable("triton", f"the Triton kernels could not be imported ({error})")


_load_triton_kernels()


# ---------------------------------------------------------------------------------------
# The C++ backend registers itself from sr3_engine._ext when the extension sr3_engine._C
# imports; otherwise the reason (not built, SR3_ENGINE_SKIP_EXT=1, import error) is kept.
# ---------------------------------------------------------------------------------------


def _load_cpp_extension() -> None:
    reason = importlib.import_module(f"{__package__}._ext").register_cpp_backend()
    if reason is not None:
        mark_unavailable("cpp", reason)


_load_cpp_extension()
