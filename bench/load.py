"""Load benchmark of serving: the scheduler against one `engine.sample` at a time and against a
batcher of whole requests, on the same engine, the same arrivals and the same images.

    python -m bench.load [--model demo-x4] [--backend fused] [--device cpu] [--scenarios mix,...]
                         [--seconds 60] [--json .benchmarks/load.json] [--markdown]

Three ways to serve each workload, one after another on one engine:
- `sequential`: one `engine.sample` at a time, in arrival order (what production code writes first);
- `whole-batch`: a generic dynamic batcher, one `engine.sample` on every queued request of the head
  request's size and sampler (up to `--batch` of them), in arrival order;
- `scheduler`: `serving.Scheduler`, tiles of every request in flight batched at every step.

Scenarios (arrivals are open loop: a request arrives at its time whatever is still running):
- `mix`: Poisson arrivals for `--seconds` at `--load` of the machine's estimated capacity; 80% of
  inputs 64x64, 17% 128x128, 3% 512x512; 70% with the model's default sampler, 30% DPM-Solver++
  20 steps (the 512x512 ones always the default: on a CPU a 20-step one takes minutes);
- `large-small`: one 512x512 request at t = 0 while 64x64 requests arrive at half the rate the
  machine serves them alone, for twice the large one's estimated time; their p95 latency is
  compared with their latency on an idle server;
- `sixteen`: sixteen 64x64 requests with 20-step DPM-Solver++, all at t = 0;
- `idle`: one 64x64 request on an idle HTTP server (`python -m sr3_engine serve`, a process of its
  own), against `engine.sample` on it, interleaved rounds, medians;
- `same-output`: one 64x64 DPM-Solver++ request amid the `sixteen` load and alone: its largest
  difference.

Reported per scenario and way: throughput (output megapixels a second, from the first arrival
to the last result), p50/p95/p99 latency per input size, denoiser calls and tiles (or images)
per call, rejections. Service times used to set arrival rates are estimated from one timed
denoiser call per tile side (the scheduler's tiling of each size times its steps).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import sr3_engine as sr3
from sr3_engine.io import atomic_path, tensor_to_pil
from sr3_engine.runtime.engine import AUTO, PRECISION_CHOICES, engine_dtype, precision_name
from sr3_engine.serving.scheduler import QueueFullError, Scheduler, SchedulerConfig

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sequential", "whole-batch", "scheduler")
SCENARIOS = ("mix", "large-small", "sixteen", "idle", "same-output")
DPM = ("dpmpp_2m", 20)
DEFAULT = (None, None)


@dataclasses.dataclass(frozen=True)
class Job:
    arrival: float
    size: int
    sampler: str | None
    steps: int | None
    seed: int


@dataclasses.dataclass
class Outcome:
    job: Job
    done: float | None = None
    rejected: bool = False
    image: torch.Tensor | None = None


def photo(size: int, seed: int) -> torch.Tensor:
    """A smooth synthetic (3, size, size) image in [0, 1]: the benchmark needs no data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    channels = [0.5 + 0.35 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(1, 7) * yy + rng.uniform(0, 6))
                for _ in range(3)]
    return torch.from_numpy(np.stack(channels)).float().clamp(0, 1)


class Runner:
    """Serves a list of jobs one way and records when each finished."""

    def __init__(self, engine: sr3.SR3Engine, mode: str, batch: int, config: SchedulerConfig):
        self.engine, self.mode, self.batch, self.config = engine, mode, batch, config
        self.calls: list[int] = []

    def run(self, jobs: list[Job]) -> list[Outcome]:
        outcomes = [Outcome(job) for job in jobs]
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731
        if self.mode == "scheduler":
            self._scheduled(outcomes, clock)
        else:
            self._queued(outcomes, clock)
        return outcomes

    def _release(self, outcomes: list[Outcome], clock: Callable[[], float], arrive: Callable[[Outcome], None]) -> None:
        for outcome in sorted(outcomes, key=lambda o: o.job.arrival):
            delay = outcome.job.arrival - clock()
            if delay > 0:
                time.sleep(delay)
            arrive(outcome)

    def _scheduled(self, outcomes: list[Outcome], clock: Callable[[], float]) -> None:
        recorder = _Calls(self.calls)
        pending = []
        with Scheduler(self.engine, self.config, metrics=recorder) as scheduler:
            def arrive(outcome: Outcome) -> None:
                job = outcome.job
                try:
                    future = scheduler.submit(photo(job.size, job.seed), steps=job.steps, sampler=job.sampler,
                                              seed=job.seed)
                except QueueFullError:
                    outcome.rejected = True
                    return

                def finished(done_future, outcome=outcome):
                    outcome.done = clock()
                    outcome.image = done_future.result().image

                future.add_done_callback(finished)
                pending.append(future)

            self._release(outcomes, clock, arrive)
            for future in pending:
                future.result()

    def _queued(self, outcomes: list[Outcome], clock: Callable[[], float]) -> None:
        arrived: queue.Queue = queue.Queue()
        feeder = threading.Thread(target=self._release, args=(outcomes, clock, arrived.put))
        feeder.start()
        waiting: collections.deque[Outcome] = collections.deque()
        served = 0
        while served < len(outcomes):
            while not arrived.empty() or not waiting:
                waiting.append(arrived.get())
            head = waiting.popleft()
            group = [head]
            if self.mode == "whole-batch":
                alike = [o for o in waiting if (o.job.size, o.job.sampler, o.job.steps) ==
                         (head.job.size, head.job.sampler, head.job.steps)][:self.batch - 1]
                for other in alike:
                    waiting.remove(other)
                group += alike
            lr = torch.stack([photo(o.job.size, o.job.seed) for o in group])
            generator = torch.Generator().manual_seed(head.job.seed)
            images = self.engine.sample(lr, generator=generator, steps=head.job.steps, sampler=head.job.sampler)
            self.calls.append(len(group))
            for outcome, image in zip(group, images):
                outcome.done, outcome.image = clock(), image
            served += len(group)
        feeder.join()


class _Calls:
    def __init__(self, calls: list[int]):
        self.calls = calls

    def denoiser_call(self, tiles: int, tile_side: int, seconds: float) -> None:
        self.calls.append(tiles)

    def finished(self, outcome: str, seconds: float, output_pixels: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


def summary(outcomes: list[Outcome], calls: list[int], scale: int) -> dict:
    served = [o for o in outcomes if o.done is not None]
    first = min(o.job.arrival for o in outcomes)
    span = max(o.done for o in served) - first
    pixels = sum((o.job.size * scale) ** 2 for o in served)
    latency = {}
    for size in sorted({o.job.size for o in served}):
        values = np.array([o.done - o.job.arrival for o in served if o.job.size == size])
        latency[f"{size}x{size}"] = {"n": len(values), **{f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}}
    return {"throughput_mp_s": pixels / span / 1e6, "seconds": span, "served": len(served),
            "rejected": sum(o.rejected for o in outcomes), "calls": len(calls),
            "per_call": float(np.mean(calls)) if calls else 0.0, "latency": latency}


def tile_seconds(engine: sr3.SR3Engine, scheduler: Scheduler) -> dict[int, float]:
    """Seconds a tile of each side costs in a full call of the scheduler's capacity (after the
    scheduler's warm-up has traced or captured it)."""
    times = {}
    with torch.inference_mode():
        for side in scheduler.tile_sides:
            capacity = scheduler.capacity[side]
            denoise = engine.backend.tile_denoiser(capacity)
            x = torch.zeros(capacity, 3, side, side, dtype=engine.dtype, device=engine.device)
            level = torch.full((capacity,), 0.5, device=engine.device)
            denoise(x, x, level)
            _synchronize(engine.device)
            started = time.perf_counter()
            for _ in range(3):
                denoise(x, x, level)
            _synchronize(engine.device)
            times[side] = (time.perf_counter() - started) / 3 / capacity
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def idle_latency(scheduler: Scheduler, rounds: int = 5) -> float:
    """Median seconds of one 64x64 request with the default sampler on the idle scheduler."""
    times = []
    for i in range(rounds + 1):
        started = time.perf_counter()
        scheduler.submit(photo(64, i), seed=i).result()
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


def service_seconds(engine: sr3.SR3Engine, scheduler: Scheduler, per_tile: dict[int, float], size: int,
                    sampler: str | None, steps: int | None) -> float:
    side, tiles, _ = scheduler.tiling_for(size * engine.scale, size * engine.scale)
    config = engine.sampler_config(sampler)
    plan_steps = sr3.make_plan(engine.schedule_for(steps), config, engine.prediction).num_steps
    return tiles * plan_steps * per_tile[side]


def workloads(args, engine: sr3.SR3Engine, estimate: Callable[[int, str | None, int | None], float]) -> dict:
    rng = np.random.default_rng(args.seed)
    loads = {}
    if "mix" in args.scenarios:
        classes = [(64, *DEFAULT, 0.8 * 0.7), (64, *DPM, 0.8 * 0.3), (128, *DEFAULT, 0.17 * 0.7),
                   (128, *DPM, 0.17 * 0.3), (512, *DEFAULT, 0.03)]
        weights = np.array([c[3] for c in classes])
        mean_service = float(sum(w * estimate(s, a, n) for (s, a, n, w) in classes))
        rate = args.load / mean_service
        jobs, t = [], 0.0
        while True:
            t += rng.exponential(1 / rate)
            if t > args.seconds:
                break
            size, sampler, steps, _ = classes[rng.choice(len(classes), p=weights)]
            jobs.append(Job(t, size, sampler, steps, len(jobs)))
        loads["mix"] = jobs
    if "large-small" in args.scenarios:
        small = estimate(64, *DEFAULT)
        until = 2 * estimate(512, *DEFAULT)
        jobs, t = [Job(0.0, 512, *DEFAULT, 0)], 0.0
        while True:
            t += rng.exponential(small / 0.5)
            if t > until:
                break
            jobs.append(Job(t, 64, *DEFAULT, len(jobs)))
        loads["large-small"] = jobs
    if "sixteen" in args.scenarios or "same-output" in args.scenarios:
        loads["sixteen"] = [Job(0.0, 64, *DPM, i) for i in range(16)]
    return loads


def idle_http(args, engine: sr3.SR3Engine, rounds: int) -> dict:
    """Median seconds of one 64x64 request: `engine.sample` in this process and POST /v1/upscale to
    a server process with the same settings, interleaved."""
    command = [sys.executable, "-m", "sr3_engine", "serve", "--model", args.model, "--backend", args.backend,
               "--device", args.device, "--dtype", args.dtype, "--port", "0", "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = server.stdout.readline()
        found = re.search(r"on (http://\S+) ", first)
        if found is None:
            raise RuntimeError(f"the server did not start: {first!r}")
        url = found[1]
        give_up = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                if time.monotonic() > give_up or server.poll() is not None:
                    raise RuntimeError("the server did not become ready within 300 s") from None
                time.sleep(0.2)
        image = photo(64, 0)
        buffer = io.BytesIO()
        tensor_to_pil(image).save(buffer, format="PNG")
        body = buffer.getvalue()
        lr = torch.round(image * 255) / 255
        engine_times, http_times = [], []
        for _ in range(rounds + 1):
            started = time.perf_counter()
            engine.sample(lr[None], generator=torch.Generator().manual_seed(0))
            engine_times.append(time.perf_counter() - started)
            call = urllib.request.Request(url + "/v1/upscale?seed=0", data=body, headers={"Content-Type": "image/png"})
            started = time.perf_counter()
            with urllib.request.urlopen(call, timeout=600) as response:
                response.read()
            http_times.append(time.perf_counter() - started)
        engine_s, http_s = float(np.median(engine_times[1:])), float(np.median(http_times[1:]))
        return {"engine_sample_s": engine_s, "http_s": http_s, "ratio": http_s / engine_s, "rounds": rounds}
    finally:
        server.terminate()
        server.wait(60)


def same_output(engine: sr3.SR3Engine, config: SchedulerConfig, amid: torch.Tensor) -> float:
    with Scheduler(engine, config) as scheduler:
        alone = scheduler.submit(photo(64, 0), sampler=DPM[0], steps=DPM[1], seed=0).result().image
    return float((alone - amid).abs().max())


def machine() -> dict:
    flags = ""
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text)
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", text))
    info = {"cpu": model[1] if Path("/proc/cpuinfo").exists() and model else platform.processor(),
            "cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(result: dict) -> str:
    lines = [f"Load benchmark, {result['date']}: `{result['command']}`; {result['machine']}", "",
             "| scenario | way | MP/s | p50 / p95 / p99 s (by input size) | calls (denoiser calls for the scheduler, "
             "`engine.sample` calls for the others) | tiles (scheduler) or images a call | rejected |",
             "|---|---|---|---|---|---|---|"]
    for scenario, modes in result["scenarios"].items():
        for mode, row in modes.items():
            latency = "; ".join(f"{size}: {v['p50']:.2f} / {v['p95']:.2f} / {v['p99']:.2f} (n={v['n']})"
                                for size, v in row["latency"].items())
            lines.append(f"| {scenario} | {mode} | {row['throughput_mp_s']:.3f} | {latency} | {row['calls']} | "
                         f"{row['per_call']:.2f} | {row['rejected']} |")
    for name, value in result.get("figures", {}).items():
        lines.append(f"- {name}: {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-x4")
    parser.add_argument("--backend", default="fused")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=AUTO, choices=PRECISION_CHOICES,
                        help="the engine's precision (default auto: bf16 where the device computes it natively)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), type=lambda s: s.split(","))
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals of the mix scenario (default 60)")
    parser.add_argument("--load", type=float, default=0.8, help="mix arrival rate, a fraction of capacity")
    parser.add_argument("--batch", type=int, default=8, help="most whole requests a whole-batch call takes")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the idle scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md table")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS) or set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown {sorted(unknown)}; scenarios {SCENARIOS}, modes {MODES}")
    engine = sr3.SR3Engine.from_pretrained(args.model, backend=args.backend, device=args.device,
                                           dtype=engine_dtype(args.dtype), progress=False,
                                           backend_options={"max_graphs": 64} if args.backend == "fused" else None)
    config = SchedulerConfig(max_queued=256)
    with Scheduler(engine, config) as sizing:
        sizing.warm_up()
        per_tile = tile_seconds(engine, sizing)
        estimate = lambda size, sampler, steps: service_seconds(engine, sizing, per_tile, size, sampler, steps)  # noqa
        loads = workloads(args, engine, estimate)
        idle_small = idle_latency(sizing)
    print(f"tile seconds {per_tile}; idle 64x64 {idle_small:.3f} s; "
          f"jobs {{{', '.join(f'{k}: {len(v)}' for k, v in loads.items())}}}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.load " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "dtype": precision_name(engine.dtype), "dtype_reason": engine.dtype_reason,
              "tile_seconds": per_tile, "idle_64_seconds": idle_small, "scenarios": {},
              "figures": {}}
    try:
        measure(args, engine, config, loads, idle_small, result)
    except KeyboardInterrupt:
        # gpu-check stops a stage at its limit with SIGINT: what finished is kept.
        result["interrupted"] = True
        save(args.json, result)
        print("interrupted; the scenarios that finished are saved", flush=True)
        return 130
    print(markdown(result), flush=True)
    save(args.json, result)
    return 0


def save(path: Path | None, result: dict) -> None:
    """Write `result` whole to `path` (nothing half-written), after every scenario."""
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


def measure(args, engine, config, loads, idle_small, result) -> None:
    """Run every scenario and mode into `result`, saving it after each, then the figures."""
    amid = None
    for scenario, jobs in loads.items():
        if not jobs:
            print(f"{scenario}: no request arrives within --seconds {args.seconds:g}; skipped", flush=True)
            continue
        if scenario == "sixteen" and "sixteen" not in args.scenarios:
            modes = ["scheduler"]
        else:
            modes = args.modes
        for mode in modes:
            runner = Runner(engine, mode, args.batch, config)
            outcomes = runner.run(jobs)
            row = summary(outcomes, runner.calls, engine.scale)
            result["scenarios"].setdefault(scenario, {})[mode] = row
            save(args.json, result)
            print(f"{scenario:<12} {mode:<12} {row['throughput_mp_s']:.3f} MP/s  {row['latency']}", flush=True)
            if scenario == "sixteen" and mode == "scheduler":
                amid = next(o.image for o in outcomes if o.job.seed == 0)
    rows = result["scenarios"]
    if "large-small" in rows and {"sequential", "scheduler"} <= set(rows["large-small"]):
        small = rows["large-small"]["scheduler"]["latency"]["64x64"]["p95"]
        result["figures"]["large-small: 64x64 p95 / its latency on the idle scheduler (target <= 3)"] = (
            f"{small / idle_small:.2f} ({small:.3f} s / {idle_small:.3f} s)")
        ratio = rows["large-small"]["scheduler"]["throughput_mp_s"] / rows["large-small"]["sequential"]["throughput_mp_s"]
        result["figures"]["large-small: throughput / sequential (target >= 0.95)"] = round(ratio, 3)
    if "sixteen" in rows and {"sequential", "scheduler"} <= set(rows["sixteen"]):
        ratio = rows["sixteen"]["scheduler"]["throughput_mp_s"] / rows["sixteen"]["sequential"]["throughput_mp_s"]
        result["figures"]["sixteen: throughput / sequential (target >= 1 on a CPU, >= 4 on a GPU)"] = round(ratio, 3)
    if "same-output" in args.scenarios and amid is not None:
        result["figures"]["same-output: max |alone - amid sixteen| (target <= 1e-5)"] = f"{same_output(engine, config, amid):.2e}"
    if "idle" in args.scenarios:
        idle = idle_http(args, engine, args.rounds)
        result["figures"]["idle: HTTP / engine.sample, 64x64 (target <= 1.1)"] = (
            f"{idle['ratio']:.3f} ({idle['http_s'] * 1e3:.0f} ms / {idle['engine_sample_s'] * 1e3:.0f} ms)")


if __name__ == "__main__":
    raise SystemExit(main())
