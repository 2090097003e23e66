"""CPU benchmarks of the C++ extension (`cpp` op backend) against plain PyTorch (`native`).

    pytest bench/test_cpp_ops.py                          # timings, grouped per case
    pytest bench/test_cpp_ops.py --benchmark-disable -q   # only checks that every case runs

- GroupNorm+SiLU (fp32, 32 groups, weight and bias) on the activation shapes of sr3-16-128 at
  128x128, batch 1 and 4, NCHW and channels_last; extra_info carries the GB/s of the one read and
  one write the fused op needs at least. The target is cpp >= 2x native.
- One tiny-config sampling step at 64x64 (the U-Net forward and the posterior update), every
  GroupNorm+SiLU and the update on the named op backend.
Timings use the threads torch uses (torch.get_num_threads()); run on an otherwise idle machine.
"""

import pytest
import torch

import sr3_engine as sr3
from sr3_engine import ops

BACKENDS = ("native", "cpp")
# (channels, height, width) of the GroupNorm+SiLU inputs of sr3-16-128 at 128x128.
SR3_16_128_ACTIVATIONS = [(64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16), (512, 8, 8)]


def _require(op: str, backend: str, x: torch.Tensor) -> None:
    reason = ops.why_unavailable(op, backend, x)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("chw", SR3_16_128_ACTIVATIONS, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, backend, layout, batch, chw):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *chw, generator=generator)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(chw[0], generator=generator), torch.randn(chw[0], generator=generator)
    _require("group_norm_silu", backend, x)
    benchmark.group = f"group_norm_silu {batch}x{'x'.join(map(str, chw))} {layout}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        out = benchmark(ops.group_norm_silu, x, 32, weight, bias, backend=backend)
    assert out.shape == x.shape
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s (1 read + 1 write)"] = 2 * x.numel() * 4 / benchmark.stats["mean"] / 1e9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_sampling_step(benchmark, backend, batch):
    torch.manual_seed(0)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny")).eval()
    sr3.set_op_backend(model, backend)
    x_up, y_t, noise = (torch.randn(batch, 3, 64, 64) for _ in range(3))
    _require("posterior_step", backend, y_t)
    level = torch.full((batch,), 0.5)
    coefficients = dict(sqrt_recip_gamma=1.3, sqrt_recipm1_gamma=0.8, coef1=0.3, coef2=0.7, sigma=0.05)

    def step():
        eps = model(x_up, y_t, level)
        return ops.posterior_step(y_t, eps, noise=noise, backend=backend, **coefficients)

    benchmark.group = f"tiny sampling step {batch}x3x64x64"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        out = benchmark(step)
    assert torch.isfinite(out).all()
