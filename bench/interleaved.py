"""`python -m bench.interleaved --problem demo-x4 --batch 4`: backends compared round by round.

Builds the suite's engines for one problem (as `pytest bench/` does), runs one warm-up sample
on each (tracing, compiling or exporting what it needs), then `--rounds` rounds in which every
variant samples once in turn, and prints a Markdown table of each variant's median time per
step, its ratio to the fastest other variant and the rounds themselves.

`--slice-bytes 1048576 4194304 none` adds fused fp32 engines with those `slice_bytes` (on the
CPU: the most bytes of one full-resolution feature map a denoiser call takes; none runs whole
batches), which is how to tune that option for a machine and a batch size.

Why beside the suite's paired rounds: there every round of a backend follows a round of eager
fp32, and the speed-up is over that round. On a machine with few cores a backend whose worker
threads spin after a run (onnxruntime's do) slows the eager round that follows it and so
inflates its own paired speed-up. Here every variant's time is its own, and drift of a shared
machine reaches all of them alike because their rounds alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from .harness import build_engine, clock_for, problem_named, resolve_device, variant_named

DEFAULT_VARIANTS = ("eager-fp32", "compile-fp32", "fused-fp32", "onnxruntime-fp32")


def interleaved_seconds(engines: dict, lr: torch.Tensor, steps: int, rounds: int,
                        clock=time.perf_counter) -> dict[str, list[float]]:
    """{variant: [seconds of one sample, per round]}, after one untimed warm-up sample each."""
    def sample(engine) -> float:
        start = clock()
        engine.sample(lr, generator=torch.Generator(lr.device).manual_seed(0), steps=steps)
        return clock() - start

    for engine in engines.values():
        sample(engine)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            seconds[name].append(sample(engine))
    return seconds


def table(seconds: dict[str, list[float]], steps: int) -> list[str]:
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    lines = ["| variant | median ms/step | vs the fastest other | rounds, ms/step |", "|---|---|---|---|"]
    for name, median in medians.items():
        others = [value for other, value in medians.items() if other != name]
        ratio = f"{min(others) / median:.2f}x" if others else "-"
        rounds = ", ".join(f"{value / steps * 1e3:.4g}" for value in seconds[name])
        lines.append(f"| {name} | {median / steps * 1e3:.4g} | {ratio} | {rounds} |")
    return lines


def slice_bytes(text: str) -> int | None:
    """A --slice-bytes value: a positive number of bytes, or none."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes or none; got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--problem", default=None,
                        help="the model of one of the suite's problems on this device (default: the first)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the problem's)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help=f"engine variants of the suite (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--slice-bytes", nargs="+", type=slice_bytes, default=[], metavar="BYTES",
                        help="also time fused-fp32 with each of these backend_options slice_bytes (CPU only; "
                             "none: whole batches)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error(f"--batch and --rounds must be positive; got {args.batch} and {args.rounds}")
    try:
        device = resolve_device(args.device)
        variants = {variant.id: variant for variant in (variant_named(device, name) for name in args.variants)}
        problem = problem_named(device, args.problem)
    except ValueError as error:
        parser.error(str(error))
    if args.slice_bytes:
        if device.type != "cpu":
            parser.error(f"--slice-bytes tunes the fused backend on the CPU; the device is {device.type}")
        fused = variant_named(device, "fused-fp32")
        for value in args.slice_bytes:
            variants[f"{fused.id} slice_bytes={value}"] = dataclasses.replace(
                fused, options=fused.options + (("slice_bytes", value),))
    steps = args.steps or problem.steps
    engines = {name: build_engine(variant, problem, device) for name, variant in variants.items()}
    generator = torch.Generator().manual_seed(args.batch)
    lr = torch.rand(args.batch, 3, problem.lr_size, problem.lr_size, generator=generator).to(device)
    seconds = interleaved_seconds(engines, lr, steps, args.rounds, clock_for(device))
    print(f"{problem.config} {problem.size}x{problem.size}, batch {args.batch}, {steps} steps a sample, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} torch threads, {device.type}")
    print("\n".join(table(seconds, steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
