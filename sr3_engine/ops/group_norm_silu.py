"""group_norm_silu: y = silu(GroupNorm(x + pre_bias[:, :, None, None]) * weight + bias).

    h[b, c, s] = x[b, c, s] + pre_bias[b, c]
    mean, var  = mean and biased variance of h over the (C/G)*H*W elements of group (b, g)
    y[b, c, s] = silu((h - mean) / sqrt(var + eps) * weight[c] + bias[c]),   silu(v) = v sigmoid(v)

x is (B, C, H, W) in NCHW or channels_last, float32/float16/bfloat16, C divisible by G;
statistics are float32 or better on every backend. In this file: the float64 reference
the tests hold every backend to, the argument rules every backend shares, the native
backend, the public entry point, and the analytic backward the fused backends register.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch


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


def check_arguments(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    pre_bias: torch.Tensor | None, *, op: str = "group_norm_silu") -> None:
    """The rules every backend shares; a bad argument raises a one-line ValueError."""
    if x.dtype not in dispatch.NATIVE_DTYPES:
        raise ValueError(f"{op}: x has dtype {x.dtype}; expected float32, float16, bfloat16 or float64")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{op}: {channels} channels are not divisible by num_groups={num_groups}")
    for name, tensor, shape in (("weight", weight, (channels,)), ("bias", bias, (channels,)),
                                ("pre_bias", pre_bias, (batch, channels))):
        if tensor is None:
            continue
        if tensor.shape != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}; got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
        if not tensor.is_floating_point():
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; expected a float dtype")


def _native(x, num_groups, weight, bias, eps, pre_bias):
    if pre_bias is not None:
        x = x + pre_bias.view(*pre_bias.shape, 1, 1).to(x.dtype)
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


dispatch.register("group_norm_silu", "native", _native)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                    pre_bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm followed by SiLU, optionally adding a per-(batch, channel) `pre_bias` first."""
    check_arguments(x, num_groups, weight, bias, pre_bias)
    return dispatch.implementation("group_norm_silu", backend, x).run(x, num_groups, weight, bias, eps, pre_bias)


def group_norm_silu_backward(grad: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float, pre_bias: torch.Tensor | None,
                             needs: tuple[bool, bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients (x, weight, bias, pre_bias) of group_norm_silu, for the fused backends' autograd.

    In float32 whatever the input dtype, on PyTorch's own GroupNorm and SiLU backward kernels:
    the statistics and the pre-activation are recomputed by `native_group_norm` (one read of
    x instead of keeping the activation), then `silu_backward` and `native_group_norm_backward`
    run fused in C++ where a chain of elementwise tensor ops would cost a pass over memory
    each. `needs` says which of the four gradients to compute.
    """
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    layout = dispatch.dense_format(x)
    h = x.float()
    if pre_bias is not None:
        h = h + pre_bias.float().view(batch, channels, 1, 1)
    h = h.contiguous(memory_format=layout)
    weight32 = weight.float() if weight is not None else None
    bias32 = bias.float() if bias is not None else None
    pre_act, mean, rstd = torch.ops.aten.native_group_norm(h, weight32, bias32, batch, channels, spatial,
                                                           num_groups, eps)
    d_pre_act = torch.ops.aten.silu_backward(grad.float().contiguous(memory_format=layout), pre_act)
    d_h, d_weight, d_bias = torch.ops.aten.native_group_norm_backward(
        d_pre_act, h, mean, rstd, weight32, batch, channels, spatial, num_groups,
        [needs[0] or needs[3], needs[1] and weight is not None, needs[2] and bias is not None])
    d_x = d_h.to(x.dtype) if needs[0] else None
    d_weight = d_weight.to(weight.dtype) if needs[1] and weight is not None else None
    d_bias = d_bias.to(bias.dtype) if needs[2] and bias is not None else None
    d_pre_bias = d_h.sum((2, 3)).to(pre_bias.dtype) if needs[3] and pre_bias is not None else None
    return d_x, d_weight, d_bias, d_pre_bias


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, pre_bias, eps = inputs
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.save_for_backward(x, weight, bias, pre_bias)


def _backward(ctx, grad):
    x, weight, bias, pre_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad  # positions in the op's schema: x, num_groups, weight, bias, pre_bias, eps
    d_x, d_weight, d_bias, d_pre_bias = group_norm_silu_backward(
        grad, x, ctx.num_groups, weight, bias, ctx.eps, pre_bias, (needs[0], needs[2], needs[3], needs[4]))
    return d_x, None, d_weight, d_bias, d_pre_bias, None


def register_autograd(op) -> None:
    """Autograd for a fused backend's group_norm_silu custom op (a CustomOpDef or its qualified
    name), whose schema must be (x, num_groups, weight, bias, pre_bias, eps)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)
