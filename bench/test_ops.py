"""Per-op benchmarks: GroupNorm+SiLU and the posterior step on every op backend and torch.compile.

    pytest bench/test_ops.py --benchmark-json ops.json

Each row reports GB/s: the bytes the op has to move at least (every input read once, the
output written once; the per-channel parameters are negligible) over the median time per
call, and that as a fraction of the device's memory bandwidth. `compile` is torch.compile of
the native op (Inductor's own fusion), compiled in the warm-up of each case. On CUDA a round
replays a CUDA graph of many calls on rotating copies of the inputs (`harness.CallGraph`):
the kernels are timed, not the Python and launch overhead around them, and the inputs come
from memory rather than the L2 cache; on the CPU a round is one direct call.

- GroupNorm+SiLU on the activation shapes of sr3-16-128 at 128x128 (32 groups): on CUDA in
  bf16 channels_last (what the fused engine runs) at batch 1 and 16, plus a decoder width of
  192 channels (6 per group) at batch 16 and a 128x1024x1024 map; on the CPU in fp32 at
  batch 1 and 4, NCHW and channels_last, and in bf16 channels_last (the CPU fused engine's
  bf16 layout) at batch 4; and on the CPU demo-x4's shapes at 256x256 (8 groups, ids ending
  in -g8), fp32 and bf16 channels_last at batch 4, where the C++ op's bf16 rows record which
  conversion ran (`bf16_path`).
- The posterior step on the sampling state (B, 3, 128, 128) at batch 1 and 32 and on a
  (32, 3, 512, 512) state, whose size is bandwidth-bound on any device; with the noise given
  as a tensor (read like the other inputs) and drawn from a seed (no noise tensor at all).
"""

from __future__ import annotations

import pytest
import torch

from sr3_engine import ops

from .harness import DTYPE_NAMES, CallGraph, median_seconds, record

BACKENDS = ("native", "triton", "cpp", "compile")
# (channels, height, width) of the GroupNorm+SiLU inputs of sr3-16-128 at 128x128.
SR3_16_128_ACTIVATIONS = ((64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16), (512, 8, 8))
# Decoder widths whose channels per group are not powers of two, and one large map.
CUDA_EXTRA_ACTIVATIONS = ((16, (192, 128, 128)), (1, (128, 1024, 1024)))
# demo-x4's GroupNorm+SiLU inputs at 64x64 -> 256x256 (8 groups): where the C++ op's bf16 path
# (the CPU's own conversion where it has AVX-512 BF16) must keep up with its fp32 one.
DEMO_X4_ACTIVATIONS = ((32, 256, 256), (64, 128, 128), (64, 64, 64), (128, 32, 32))
GROUP_NORM_CASES = {
    "cuda": [(batch, chw, "channels_last", torch.bfloat16, 32) for batch in (1, 16) for chw in SR3_16_128_ACTIVATIONS]
    + [(batch, chw, "channels_last", torch.bfloat16, 32) for batch, chw in CUDA_EXTRA_ACTIVATIONS],
    "cpu": [(batch, chw, layout, torch.float32, 32) for batch in (1, 4) for chw in SR3_16_128_ACTIVATIONS
            for layout in ("nchw", "channels_last")]
    + [(4, chw, "channels_last", torch.bfloat16, 32) for chw in SR3_16_128_ACTIVATIONS]
    + [(4, chw, "channels_last", dtype, 8) for chw in DEMO_X4_ACTIVATIONS for dtype in (torch.float32, torch.bfloat16)],
}
POSTERIOR_SHAPES = ((1, 3, 128, 128), (32, 3, 128, 128), (32, 3, 512, 512))
COEFFICIENTS = dict(state_coef=1.3, output_coef=0.8, coef1=0.3, coef2=0.7, sigma=0.05)


def _case_id(case) -> str:
    batch, chw, layout, dtype, groups = case
    return f"{batch}x{'x'.join(map(str, chw))}-{layout}-{DTYPE_NAMES[dtype]}" + (f"-g{groups}" if groups != 32 else "")


def pytest_generate_tests(metafunc):
    if "group_norm_case" in metafunc.fixturenames:
        device = metafunc.config._sr3_device.type
        cases = GROUP_NORM_CASES[device]
        metafunc.parametrize("group_norm_case", cases, ids=[_case_id(c) for c in cases])


def _runner(op_name: str, backend: str, fn, x: torch.Tensor):
    """fn(backend=...) for an op backend, or torch.compile of the native op; skips what cannot run."""
    if backend == "compile":
        # A fresh Dynamo cache per case: the same code object at many shapes would otherwise hit
        # the recompile limit and silently fall back to eager.
        torch._dynamo.reset()
        # Not fullgraph: the seeded native posterior step makes its own torch.Generator, which
        # Dynamo leaves to eager; that is what a user compiling it gets.
        return torch.compile(lambda *args, **kwargs: fn(*args, backend="native", **kwargs), dynamic=False)
    if backend == "triton" and x.device.type != "cuda":
        pytest.skip("Triton kernels run on CUDA; on the CPU only its interpreter runs them, which says nothing of speed")
    reason = ops.why_unavailable(op_name, backend, x)
    if reason is not None:
        pytest.skip(f"{op_name} on {backend}: {reason}")
    return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)


def _timed(benchmark, run, make_inputs, bytes_per_call: int, device: torch.device):
    """Benchmark `run` on the inputs; (output, calls per round)."""
    if device.type != "cuda":
        args, kwargs = make_inputs()
        with torch.inference_mode():
            return benchmark(run, *args, **kwargs), 1
    with torch.inference_mode():
        graph = CallGraph(run, make_inputs, bytes_per_call, device)
        benchmark(graph.replay)
    return graph.output, graph.calls


def _report(benchmark, device_info, backend: str, bytes_moved: int, calls: int, **fields) -> None:
    seconds = median_seconds(benchmark)
    gbps = bytes_moved * calls / seconds / 1e9 if seconds else None
    record(benchmark, device_info, kind="op", case=benchmark.group, backend=backend, bytes=bytes_moved,
           calls_per_round=calls, gbps=gbps,
           bandwidth_fraction=gbps * 1e9 / device_info.peak_bytes_per_s if gbps else None, **fields)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu(benchmark, device, device_info, group_norm_case, backend):
    batch, (channels, height, width), layout, dtype, groups = group_norm_case
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, generator=generator)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, device=device, dtype=dtype, generator=generator)
    bias = torch.randn(channels, device=device, dtype=dtype, generator=generator)
    run = _runner("group_norm_silu", backend, ops.group_norm_silu, x)
    benchmark.group = f"group_norm_silu {_case_id(group_norm_case)}"
    bytes_per_call = 2 * x.numel() * x.element_size()
    out, calls = _timed(benchmark, run, lambda: ((x.clone(), groups, weight, bias), {}), bytes_per_call, device)
    _report(benchmark, device_info, backend, bytes_per_call, calls, op="group_norm_silu", dtype=DTYPE_NAMES[dtype],
            groups=groups, **_bf16_path(backend, x))
    assert out.shape == x.shape and out.dtype == dtype


def _bf16_path(backend: str, x: torch.Tensor) -> dict:
    """Which bf16 conversion the C++ op ran on the CPU (the CPU's own AVX-512 BF16 one, or generic)."""
    if backend != "cpp" or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return {}
    from sr3_engine import _C

    return {"bf16_path": _C.bf16_path()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", ["tensor", "seeded"])
@pytest.mark.parametrize("shape", POSTERIOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_posterior_step(benchmark, device, device_info, shape, noise, backend):
    if device.type == "cuda" and noise == "seeded" and backend in ("native", "compile"):
        pytest.skip("the native seeded step seeds a new torch.Generator per call, which a CUDA graph cannot capture")
    # The engines keep the state in fp32 and feed eps in the model's dtype: bf16 on CUDA.
    eps_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    y_t = torch.randn(shape, device=device, generator=generator)
    eps = torch.randn(shape, device=device, generator=generator).to(eps_dtype)
    noise_tensor = torch.randn(shape, device=device, generator=generator) if noise == "tensor" else None
    run = _runner("posterior_step", backend, ops.posterior_step, y_t)
    benchmark.group = f"posterior_step {'x'.join(map(str, shape))}-noise-{noise}"

    def make_inputs():
        noise_kwargs = {"noise": noise_tensor.clone()} if noise_tensor is not None else {"seed": 1234, "step": 7}
        return (y_t.clone(), eps.clone()), {**noise_kwargs, **COEFFICIENTS}

    tensors = [y_t, eps, y_t] + ([noise_tensor] if noise_tensor is not None else [])  # y_t twice: in and out
    bytes_per_call = sum(t.numel() * t.element_size() for t in tensors)
    out, calls = _timed(benchmark, run, make_inputs, bytes_per_call, device)
    _report(benchmark, device_info, backend, bytes_per_call, calls, op="posterior_step", dtype="fp32")
    assert out.shape == y_t.shape
