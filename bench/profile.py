"""`python -m bench.profile [--variant fused-bf16] [--batch 8] [--problem demo-x4]`: where one `engine.sample` spends its time.

Builds the engine exactly as the benchmark suite does (same problem, same variant), runs one
warm-up sample, then profiles one more with torch.profiler and prints a Markdown table of the
kernels (CUDA) or operators (CPU) with the most self time, each with its share of the total.
That table names the largest remaining cost in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .harness import build_engine, problem_named, resolve_device, variant_named


def top_kernels(events, on_cuda: bool, top: int) -> tuple[list[tuple[str, float, int]], float]:
    """[(name, self milliseconds, calls)] of the `top` most expensive names, and the total in ms."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if on_cuda and (event.device_type != DeviceType.CUDA or event.is_user_annotation):
            continue  # the CPU op that launched a kernel carries the kernel's time as well: count it once
        self_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if self_us > 0:
            totals[event.key] += self_us / 1e3
            calls[event.key] += event.count
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [(name, ms, calls[name]) for name, ms in ranked], sum(totals.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variant", default="fused-bf16", help="an engine variant of the suite, e.g. eager-fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--problem", default=None,
                        help="the model of one of the suite's problems on this device (default: the first)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the problem's)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        variant = variant_named(device, args.variant)
        problem = problem_named(device, args.problem)
    except ValueError as error:
        parser.error(str(error))
    steps = args.steps or problem.steps
    engine = build_engine(variant, problem, device)
    lr = torch.rand(args.batch, 3, problem.lr_size, problem.lr_size, generator=torch.Generator().manual_seed(0))
    lr = lr.to(device)

    def sample() -> None:
        engine.sample(lr, generator=torch.Generator(device).manual_seed(0), steps=steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sample()
    start = time.perf_counter()
    sample()
    wall_ms = (time.perf_counter() - start) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        sample()
    ranked, total_ms = top_kernels(profiler.key_averages(), device.type == "cuda", args.top)
    where = "GPU kernel" if device.type == "cuda" else "CPU operator"
    print(f"{variant.id}, {problem.config} {problem.size}x{problem.size}, batch {args.batch}, {steps} steps on "
          f"{device.type}: {wall_ms:.1f} ms wall time unprofiled, {total_ms:.1f} ms of {where} self time "
          "profiled\n")
    print(f"| {where} | self ms | share | calls |")
    print("|---|---|---|---|")
    for name, ms, count in ranked:
        print(f"| `{name}` | {ms:.1f} | {100 * ms / total_ms:.1f}% | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
