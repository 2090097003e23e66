"""`make gpu-check` (`python3 -m bench.gpu_check`): the one command for a GPU machine, under 8 minutes.

On a bare GPU machine (see the GPU notes: the packages are installed, there is no network),
in this order, each stage with its own time limit so that a slow one cannot eat the others':

1. install: `pip install --no-deps --no-build-isolation -e .`, the extension built for sm_90
   and required to build (CUDA kernels included);
2. correctness: every gpu-marked test, and the kernel, op, extension, engine and tiling tests,
   with TRITON_INTERPRET unset (real kernels, captured graphs, the liveness replay check);
3. ops: GroupNorm+SiLU GB/s on (16,64,128,128), (16,192,128,128) and (1,128,1024,1024) bf16
   channels_last, and the seeded posterior step on (32,3,512,512);
4. sample: 100-step `engine.sample` of sr3-16-128 at batch 1 and 16 for eager fp32, eager bf16
   and fused bf16, with peak memory;
5. compile: the same for compile bf16 (torch.compile's default mode: max-autotune does not fit
   the time), a stage of its own so that a slow compile loses no other figure;
6. serve: the load benchmark (`bench.load`) on demo-x4, fused bf16: the serving scheduler against
   one `engine.sample` at a time and a batcher of whole requests, with a short mix;
7. report: `bench.report --print` of the benchmark files.

Everything goes to `--out` (default $OUT, else gpu-check-out/): gpu-check.log (every stage's
output), gpu-tests.xml, gpu-ops.json, gpu-sample.json, gpu-compile.json, gpu-load.json,
gpu-report.md and gpu-check.json (the stages and the table): eight files. The short table is printed last. Back
on a development machine, `python -m bench.report OUT/gpu-ops.json OUT/gpu-sample.json
OUT/gpu-compile.json` writes the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
# Every gpu-marked test, and the tests whose kernels run for real on a GPU (interpreted elsewhere).
CORRECTNESS_TESTS = ("tests/test_gpu_readiness.py", "tests/test_kernels.py", "tests/test_ops.py",
                     "tests/test_engine.py", "tests/test_tiling.py", "tests/test_cpp_ext.py",
                     "tests/test_bench.py::test_the_cuda_clock_waits_for_the_work_it_times",
                     "tests/test_export.py::test_tensorrt_engine_matches_eager")
OPS_SELECTION = ("group_norm_silu and (16x64x128x128 or 16x192x128x128 or 1x128x1024x1024) and not compile "
                 "or posterior_step and 32x3x512x512 and seeded")
SAMPLE_SELECTION = "test_sample and (eager-fp32 or eager-bf16 or fused-bf16) and (batch1] or batch16])"
COMPILE_SELECTION = "test_sample and compile-bf16 and (batch1] or batch16])"
BENCH_FILES = ("gpu-ops.json", "gpu-sample.json", "gpu-compile.json")
LOAD_FILE = "gpu-load.json"
# The machine's per-command limit is 10 minutes and the check must fit 8 with its start-up.
BUDGET_S = 480


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]
    timeout_s: int
    env: tuple[tuple[str, str], ...] = ()


def stages(out: Path, python: str, install: bool) -> list[Stage]:
    bench = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda",
             "--benchmark-min-rounds", "2", "--benchmark-max-time", "0.5")
    planned = [
        Stage("correctness", (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                              "--junitxml", str(out / "gpu-tests.xml"), *CORRECTNESS_TESTS), 100),
        Stage("ops", (*bench, "bench/test_ops.py", "-k", OPS_SELECTION, "--benchmark-json",
                      str(out / "gpu-ops.json")), 40),
        Stage("sample", (*bench, "bench/test_sample.py", "-k", SAMPLE_SELECTION, "--benchmark-json",
                         str(out / "gpu-sample.json")), 90),
        Stage("compile", (*bench, "bench/test_sample.py", "-k", COMPILE_SELECTION, "--compile-mode", "default",
                          "--benchmark-json", str(out / "gpu-compile.json")), 70),
    ]
    if install:
        planned.insert(0, Stage("install", (python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                            "-e", "."), 135,
                                (("CMAKE_ARGS", "-DCMAKE_CUDA_ARCHITECTURES=90"), ("SR3_ENGINE_REQUIRE_EXT", "1"))))
    planned.append(Stage("serve", (python, "-m", "bench.load", "--device", "cuda", "--dtype", "bf16", "--seconds", "8",
                                   "--rounds", "5", "--json", str(out / LOAD_FILE)), 45))
    return planned


def run_stage(stage: Stage, log) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(stage.env)
    log.write(f"\n===== {stage.name}: {' '.join(stage.command)}\n")
    log.flush()
    started = time.perf_counter()
    try:
        code = subprocess.run(stage.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=stage.timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - started
    log.write(f"===== {stage.name}: exit {code} after {seconds:.0f} s\n")
    return {"stage": stage.name, "exit": code, "seconds": round(seconds, 1)}


def table(out: Path) -> list[str]:
    """One line per benchmark row in the JSON files that exist under `out`."""
    lines = []
    for name in BENCH_FILES:
        path = out / name
        if not path.is_file():
            lines.append(f"{name}: missing (its stage did not finish)")
            continue
        for row in json.loads(path.read_text()).get("benchmarks", []):
            info, median = row.get("extra_info", {}), row.get("stats", {}).get("median")
            if median is None:
                continue
            if info.get("kind") == "op":
                lines.append(f"{row['name']:<62} {median * 1e6:10.1f} us  {info.get('gbps', 0):8.0f} GB/s  "
                             f"{info.get('bandwidth_fraction', 0):6.1%} of peak")
            else:
                peak = info.get("peak_memory_bytes")
                lines.append(f"{row['name']:<62} {median:10.3f} s   {info.get('images_per_s', 0):8.2f} img/s  "
                             f"{info.get('roofline_fraction', 0):6.1%} roofline"
                             + (f"  peak {peak / 2**30:.2f} GiB" if peak is not None else ""))
    load = out / LOAD_FILE
    if load.is_file():
        result = json.loads(load.read_text())
        for scenario, modes in result.get("scenarios", {}).items():
            lines.append(f"load {scenario}: " + ", ".join(f"{mode} {row['throughput_mp_s']:.2f} MP/s"
                                                          for mode, row in modes.items()))
        lines += [f"load {name}: {value}" for name, value in result.get("figures", {}).items()]
    else:
        lines.append(f"{LOAD_FILE}: missing (its stage did not finish)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"),
                        help="results folder (default: $OUT, else gpu-check-out/)")
    parser.add_argument("--no-install", dest="install", action="store_false", help="skip the editable install")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every stage")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.out / "gpu-check.log", "w") as log:
        for stage in stages(args.out.resolve(), args.python, args.install):
            results.append(run_stage(stage, log))
            print(f"{stage.name}: exit {results[-1]['exit']} after {results[-1]['seconds']:.0f} s", flush=True)
            if stage.name == "install" and results[-1]["exit"] != 0:
                break
    inputs = [str(args.out / name) for name in BENCH_FILES if (args.out / name).is_file()]
    if inputs:
        report = subprocess.run([args.python, "-m", "bench.report", *inputs, "--print"], cwd=ROOT,
                                capture_output=True, text=True)
        (args.out / "gpu-report.md").write_text(report.stdout + report.stderr)
    lines = table(args.out)
    (args.out / "gpu-check.json").write_text(json.dumps({"stages": results, "table": lines}, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
