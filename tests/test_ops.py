"""Fused ops against their float64 references (docs/ARCHITECTURE.md, "Tests"), for every available backend.

Three-way rule: |backend - ref_fp64| <= 2 * |native_same_dtype - ref_fp64| + atol.
Backends that are not built here are skipped with the reason the dispatcher gives. The Triton
cases run on CUDA tensors when there is a GPU (the kernels compiled for real, and the native
reference on the same device), else on the CPU under the interpreter; they are marked `cuda`.
"""

import pytest
import torch

from sr3_engine import ops

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STEP = dict(state_coef=1.7, output_coef=1.37, coef1=0.21, coef2=0.83, sigma=0.12)
DTYPES = list(ATOL)
# Every op backend; the triton cases marked as CUDA cases.
BACKENDS = [pytest.param(backend, marks=pytest.mark.cuda) if backend == "triton" else backend
            for backend in ops.OP_BACKENDS]


def _device(backend: str) -> torch.device:
    """Where a backend's cases run: Triton's on CUDA when there is a GPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _require(op: str, backend: str, x: torch.Tensor) -> None:
    reason = ops.why_unavailable(op, backend, x)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _three_way(out: torch.Tensor, native: torch.Tensor, ref64: torch.Tensor, atol: float) -> None:
    err = (out.double() - ref64).abs()
    bound = 2 * (native.double() - ref64).abs() + atol
    worst = (err - bound).max().item()
    assert worst <= 0, f"max excess over the three-way bound: {worst:.3g} (max err {err.max().item():.3g})"


def _inputs(batch, channels, height, width, dtype, channels_last, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, height, width, generator=g) * 3 + 1.5).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(channels, generator=g) * 0.5 + 1).to(device, dtype)
    bias = (torch.randn(channels, generator=g) * 0.5).to(device, dtype)
    pre_bias = torch.randn(batch, channels, generator=g).to(device, dtype)
    return x, weight, bias, pre_bias


SMALL_GRID = [(1, 64, 16, 1, 1), (5, 64, 32, 7, 9), (1, 64, 32, 64, 64), (2, 48, 3, 5, 4)]
FULL_GRID = [(b, 64, g, h, w) for b in (1, 5) for g in (16, 32) for h, w in ((1, 1), (7, 9), (64, 64))]


def _check_group_norm_silu(backend, dtype, shape, channels_last, use_pre_bias):
    batch, channels, groups, height, width = shape
    x, weight, bias, pre_bias = _inputs(batch, channels, height, width, dtype, channels_last, device=_device(backend))
    pre = pre_bias if use_pre_bias else None
    _require("group_norm_silu", backend, x)
    ref64 = ops.group_norm_silu_ref(x.double(), groups, weight.double(), bias.double(),
                                    pre_bias=None if pre is None else pre.double())
    native = ops.group_norm_silu(x, groups, weight, bias, pre_bias=pre, backend="native")
    out = ops.group_norm_silu(x, groups, weight, bias, pre_bias=pre, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    _three_way(out, native, ref64, ATOL[dtype])
    torch.testing.assert_close(native.double(), ref64, atol=ATOL[dtype] * 4, rtol=ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_GRID, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("use_pre_bias", [False, True], ids=["", "pre_bias"])
def test_group_norm_silu(backend, dtype, shape, channels_last, use_pre_bias):
    _check_group_norm_silu(backend, dtype, shape, channels_last, use_pre_bias)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FULL_GRID, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_full_grid(backend, dtype, shape, channels_last):
    _check_group_norm_silu(backend, dtype, shape, channels_last, True)


def test_group_norm_silu_reference_is_groupnorm_then_silu():
    x, weight, bias, _ = _inputs(3, 12, 4, 5, torch.float64, False)
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, weight, bias, 1e-5))
    torch.testing.assert_close(ops.group_norm_silu_ref(x, 4, weight, bias), expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu_gradients(backend, channels_last):
    x, weight, bias, pre_bias = _inputs(2, 16, 5, 3, torch.float32, channels_last, seed=3, device=_device(backend))
    _require("group_norm_silu", backend, x)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, pre_bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias, pre_bias)]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x.device)
    out = ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], pre_bias=leaves[3], backend=backend)
    (out * upstream).sum().backward()
    ref = ops.group_norm_silu_ref(leaves64[0], 4, leaves64[1], leaves64[2], pre_bias=leaves64[3])
    (ref * upstream.double()).sum().backward()
    for got, want in zip(leaves, leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [backend for backend in BACKENDS if backend != "native"])
def test_group_norm_silu_gradients_without_affine_in_16_bit(backend, dtype):
    # The backward runs in float32 and returns each gradient in its input's dtype.
    x, _, _, pre_bias = _inputs(3, 8, 7, 5, dtype, True, seed=4, device=_device(backend))
    _require("group_norm_silu", backend, x)
    leaves = [t.clone().requires_grad_() for t in (x, pre_bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, pre_bias)]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.device)
    out = ops.group_norm_silu(leaves[0], 2, pre_bias=leaves[1], backend=backend)
    (out.float() * upstream).sum().backward()
    (ops.group_norm_silu_ref(leaves64[0], 2, None, None, pre_bias=leaves64[1]) * upstream.double()).sum().backward()
    for got, want in zip(leaves, leaves64):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=ATOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("call, message", [
    (lambda x: ops.group_norm_silu(x, 5), "not divisible"),
    (lambda x: ops.group_norm_silu(x[0], 4), "4-D"),
    (lambda x: ops.group_norm_silu(x, 4, torch.ones(3)), "weight must have shape"),
    (lambda x: ops.group_norm_silu(x, 4, pre_bias=torch.ones(8)), "pre_bias must have shape"),
    (lambda x: ops.group_norm_silu(x, 4, backend="cuda"), "unknown backend"),
])
def test_group_norm_silu_rejects_bad_arguments(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call(torch.randn(2, 8, 3, 3))


def _without_fused_backends(monkeypatch):
    """The registry as a build without the Triton kernels and the C++ extension sees it."""
    registry = {op: {"native": impls["native"]} for op, impls in ops.dispatch._REGISTRY.items()}
    monkeypatch.setattr(ops.dispatch, "_REGISTRY", registry)
    monkeypatch.setattr(ops.dispatch, "_UNAVAILABLE_REASONS", {"triton": "no triton in this test", "cpp": "no _C here"})


@pytest.mark.parametrize("backend, reason", [("triton", "no triton in this test"), ("cpp", "no _C here")])
def test_a_named_backend_that_cannot_run_raises_with_the_reason(monkeypatch, backend, reason):
    _without_fused_backends(monkeypatch)
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(RuntimeError, match=f"group_norm_silu: backend '{backend}' cannot run on cpu .*: {reason}"):
        ops.group_norm_silu(x, 4, backend=backend)
    with pytest.raises(RuntimeError, match=f"posterior_step: backend '{backend}' cannot run on cpu .*: {reason}"):
        ops.posterior_step(x, x, **{**STEP, "sigma": 0.0}, backend=backend)


def test_a_backend_whose_predicate_refuses_is_not_picked_by_auto(monkeypatch):
    calls = []
    monkeypatch.setitem(ops.dispatch._REGISTRY["group_norm_silu"], "cpp", ops.dispatch.Implementation(
        lambda *args: calls.append(args), lambda x: "refuses every tensor in this test"))
    x = torch.randn(1, 8, 2, 2)
    assert ops.resolve_backend("group_norm_silu", "auto", x) == "native"
    torch.testing.assert_close(ops.group_norm_silu(x, 4), ops.group_norm_silu_ref(x, 4, None, None),
                               rtol=1e-5, atol=1e-5)
    assert calls == []
    with pytest.raises(RuntimeError, match="refuses every tensor in this test"):
        ops.group_norm_silu(x, 4, backend="cpp")


def test_auto_falls_back_to_native_without_fused_backends(monkeypatch):
    _without_fused_backends(monkeypatch)
    x = torch.randn(2, 8, 3, 3)
    assert ops.available_backends("group_norm_silu", x) == ["native"]
    torch.testing.assert_close(ops.group_norm_silu(x, 4), ops.group_norm_silu_ref(x, 4, None, None),
                               rtol=1e-5, atol=1e-5)


def test_a_seed_tensor_means_the_same_noise_as_its_int(monkeypatch):
    y_t = torch.zeros(1, 3, 4, 4)
    for backend in ops.available_backends("posterior_step", y_t):
        by_int = ops.posterior_step(y_t, y_t, **STEP, seed=-5, step=2, backend=backend)
        by_tensor = ops.posterior_step(y_t, y_t, **STEP, seed=torch.tensor(-5), step=2, backend=backend)
        torch.testing.assert_close(by_tensor, by_int, rtol=0, atol=0, msg=backend)


def test_only_backends_that_read_a_device_seed_can_be_captured():
    cuda = torch.device("cuda")
    assert ops.why_no_device_seed("native", torch.device("cpu")) is None
    assert "CUDA graph" in ops.why_no_device_seed("native", cuda)
    if "cpp" in ops.available_backends("posterior_step", torch.zeros(1)):
        assert "CUDA graph" in ops.why_no_device_seed("cpp", cuda)
    if ops.why_unavailable("posterior_step", "triton", torch.zeros(1)) is None:
        assert ops.why_no_device_seed("triton", cuda) is None


# --------------------------------------------------------------------------- posterior_step

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (5, 3, 7, 9), (2, 3, 64, 64)], ids=str)
def test_posterior_step_with_given_noise(backend, dtype, clip, shape):
    g = torch.Generator().manual_seed(1)
    y_t, eps, noise = (torch.randn(shape, generator=g).to(_device(backend), dtype) for _ in range(3))
    _require("posterior_step", backend, y_t)
    ref64 = ops.posterior_step_ref(y_t.double(), eps.double(), noise=noise.double(), clip=clip, **STEP)
    native = ops.posterior_step(y_t, eps, noise=noise, clip=clip, backend="native", **STEP)
    out = ops.posterior_step(y_t, eps, noise=noise, clip=clip, backend=backend, **STEP)
    assert out.dtype == dtype
    _three_way(out, native, ref64, ATOL[dtype])


def test_posterior_step_reference_is_the_formula():
    y_t, eps, noise = torch.tensor([0.9, -2.0]), torch.tensor([0.1, 0.5]), torch.tensor([1.0, -1.0])
    out = ops.posterior_step_ref(y_t, eps, noise=noise, **STEP)
    y0 = [min(1.0, max(-1.0, 0.9 * 1.7 - 0.1 * 1.37)), min(1.0, max(-1.0, -2.0 * 1.7 - 0.5 * 1.37))]
    expected = [0.21 * y0[0] + 0.83 * 0.9 + 0.12, 0.21 * y0[1] - 0.83 * 2.0 - 0.12]
    torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_posterior_step_seeded_noise(backend):
    y_t = torch.zeros(4, 3, 32, 32, device=_device(backend))
    _require("posterior_step", backend, y_t)
    # With y_t = eps = 0 the output is sigma * z, so it exposes the noise.
    kwargs = dict(state_coef=1.0, output_coef=1.0, coef1=0.0, coef2=0.0, sigma=1.0, backend=backend)
    z = ops.posterior_step(y_t, y_t, seed=7, step=3, **kwargs)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.05
    torch.testing.assert_close(z, ops.posterior_step(y_t, y_t, seed=7, step=3, **kwargs), rtol=0, atol=0)
    assert not torch.allclose(z, ops.posterior_step(y_t, y_t, seed=7, step=4, **kwargs))
    assert not torch.allclose(z, ops.posterior_step(y_t, y_t, seed=8, step=3, **kwargs))


def test_posterior_step_needs_no_noise_when_sigma_is_zero():
    y_t = torch.randn(1, 3, 4, 4)
    out = ops.posterior_step(y_t, y_t, **{**STEP, "sigma": 0.0})
    torch.testing.assert_close(out, ops.posterior_step_ref(y_t, y_t, **{**STEP, "sigma": 0.0}))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs noise or a seed"),
    ({"noise": torch.zeros(1, 3, 4, 4), "seed": 1}, "either noise or seed"),
    ({"noise": torch.zeros(1, 3, 4, 5)}, "must match"),
])
def test_posterior_step_rejects_bad_arguments(kwargs, message):
    y_t = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=message):
        ops.posterior_step(y_t, y_t, **STEP, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_posterior_step_keeps_nan_through_the_clip(backend):
    y_t = torch.zeros(1, 3, 4, 4, device=_device(backend))
    _require("posterior_step", backend, y_t)
    eps = torch.zeros_like(y_t)
    eps[0, 1, 2, 3] = float("nan")
    out = ops.posterior_step(y_t, eps, clip=True, backend=backend, **{**STEP, "sigma": 0.0})
    assert torch.isnan(out[0, 1, 2, 3]) and torch.isfinite(out).sum() == out.numel() - 1
