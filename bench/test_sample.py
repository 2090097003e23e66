"""End-to-end `engine.sample` and per-step denoiser latency, every engine backend side by side.

    pytest bench/test_sample.py --benchmark-json sample.json

`test_sample`: one `engine.sample` call of `problem.steps` (100) ancestral steps on a batch
of low-res images, one warm-up round (which compiles, exports or captures what the backend
needs) and then `--benchmark-min-rounds` timed rounds, each right after a round of the
eager-fp32 baseline whose median goes into the row (`paired_baseline_seconds`).
`test_step`: one reverse step (a denoiser call and the posterior update) through the same
engine backend, from the middle of the same 100-step plan (not paired). Rows carry FLOPs per
step (torch.utils.flop_counter), images/s, ms per step and the fraction of the device's FLOP
roofline the denoiser's FLOPs reach, in the precision it computes in (`DeviceInfo.peak_flops`).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from sr3_engine import ops
from sr3_engine.samplers import make_plan

from .harness import (BASELINE_BY_DEVICE, DTYPE_NAMES, TORCH_ALLOCATED_BACKENDS, call_memory, flops_per_image,
                      median_seconds, record)


def _inputs(device, problem, batch):
    generator = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, problem.lr_size, problem.lr_size, generator=generator).to(device)


def _op_backend(engine, variant) -> str | None:
    """What runs the network's GroupNorm+SiLU (`auto` resolved), for the backends that run our module."""
    if variant.backend not in TORCH_ALLOCATED_BACKENDS:
        return None
    probe = torch.empty(1, 8, 1, 1, device=engine.backend.device, dtype=engine.dtype)
    return ops.resolve_backend("group_norm_silu", engine.backend.op_backend, probe)


def _flops_per_step(engine, problem, batch) -> int:
    """The denoiser's FLOPs in one step: of the whole images, or of every tile (overlaps counted twice)."""
    if problem.tile is None:
        return batch * flops_per_image(problem.config, problem.size, problem.size)
    grid = engine.tile_grid(batch, (problem.size, problem.size), tile=problem.tile, tile_overlap=problem.tile_overlap)
    return batch * grid.count * flops_per_image(problem.config, *grid.tile)


def _fields(engine, variant, problem, batch, seconds, steps, device_info, compile_mode):
    flops_per_step = _flops_per_step(engine, problem, batch)
    fields = dict(variant=variant.id, backend=variant.backend, batch=batch,
                  steps=steps, config=problem.config, height=problem.size, width=problem.size,
                  flops_per_step=flops_per_step, op_backend=_op_backend(engine, variant),
                  compile_mode=variant.with_compile_mode(compile_mode).compile_mode,
                  tile=problem.tile, tile_overlap=problem.tile_overlap)
    peak, precision = device_info.peak_flops(engine.dtype)
    fields.update(dtype=DTYPE_NAMES[engine.dtype], dtype_reason=engine.dtype_reason,
                  roofline_peak_tflops=float(f"{peak / 1e12:.4g}"), roofline_precision=precision)
    if seconds:
        fields.update(ms_per_step=seconds / steps * 1e3, images_per_s=batch / seconds,
                      roofline_fraction=flops_per_step * steps / seconds / peak)
    return fields


def test_sample(benchmark, pytestconfig, engines, clock, device, device_info, problem, rounds, variant, batch):
    engine = engines(variant, problem)
    lr = _inputs(device, problem, batch)

    def sample_on(chosen):
        return chosen.sample(lr, generator=torch.Generator(device).manual_seed(0), steps=problem.steps,
                             tile=problem.tile, tile_overlap=problem.tile_overlap)

    # Each round of a backend follows one round of the baseline, timed by the same clock, so that
    # the speed-up compares runs made under the same machine conditions (shared machines drift).
    baseline_variant = BASELINE_BY_DEVICE[device.type]
    baseline = engines(baseline_variant, problem) if variant != baseline_variant else None
    baseline_seconds: list[float] = []

    def run_baseline() -> None:
        start = clock()
        sample_on(baseline)
        baseline_seconds.append(clock() - start)

    benchmark.group = f"sample {problem.config} {problem.size}x{problem.size} batch {batch}"
    hr = benchmark.pedantic(sample_on, args=(engine,), setup=run_baseline if baseline is not None else None,
                            rounds=rounds, warmup_rounds=1, iterations=1)
    paired = statistics.median(baseline_seconds[-rounds:]) if baseline_seconds and benchmark.stats else None
    # Recorded before the checks and the memory calls: neither a failed check nor a stop during
    # those calls may cost the row its timings.
    record(benchmark, device_info, kind="sample", paired_baseline_seconds=paired,
           **_fields(engine, variant, problem, batch, median_seconds(benchmark), problem.steps, device_info,
                     pytestconfig.getoption("--compile-mode")))
    assert hr.shape == (batch, 3, problem.size, problem.size) and bool(torch.isfinite(hr).all())
    if device.type == "cuda" and benchmark.stats and variant.backend in TORCH_ALLOCATED_BACKENDS:
        # Calls of its own, since the timed rounds alternate with the baseline's.
        benchmark.extra_info.update(call_memory(engine, lambda: sample_on(engine), device))


@pytest.mark.whole_images  # a step of a tiled problem is many denoiser calls: measured end to end only
def test_step(benchmark, pytestconfig, engines, device, device_info, problem, variant, batch):
    engine = engines(variant, problem)
    full = make_plan(engine.schedule.respaced(problem.steps), engine.sampler)
    middle = full.num_steps // 2
    one_step = full.window(middle, middle + 1)
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, problem.size, problem.size)
    x_up = torch.rand(shape, device=device, generator=generator) * 2 - 1
    y_t = torch.randn(shape, device=device, generator=generator)

    def step():
        return engine.backend.run(x_up, y_t, one_step, generator=generator, callback=None)

    benchmark.group = f"step {problem.config} {problem.size}x{problem.size} batch {batch}"
    y = benchmark(step)
    record(benchmark, device_info, kind="step", **_fields(engine, variant, problem, batch, median_seconds(benchmark),
                                                          1, device_info, pytestconfig.getoption("--compile-mode")))
    assert y.shape == shape and bool(torch.isfinite(y).all())
