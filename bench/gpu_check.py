"""`make gpu-check` (`python3 -m bench.gpu_check`): the one command for a GPU machine, under 8 minutes.

On a bare GPU machine (see the GPU notes: the packages are installed, there is no network), in
this order:

1. install: `bench.offline_install`, the editable install without network or version check,
   the extension built for sm_90; when it cannot be built, installed without it (the stage
   fails, every other stage still runs);
2. correctness: only what needs a GPU, with TRITON_INTERPRET unset and the extension required:
   the gpu-marked tests and the cases marked `cuda` (the Triton kernels compiled for real, their
   op cases on CUDA tensors, captured graphs, the tiled capture); no CPU-only test and no compile
   check (CI runs those);
3. ops: GroupNorm+SiLU GB/s on (16,64,128,128), (16,192,128,128) and (1,128,1024,1024) bf16
   channels_last, and the seeded posterior step on (32,3,512,512);
4. sample: 100-step `engine.sample` of sr3-16-128 at batch 1 and 16: eager fp32 and bf16 on plain
   PyTorch ops (the baseline), eager bf16 on the Triton ops, fused bf16; and a 20-step fused bf16
   sample of a 512x512 image in 128-pixel tiles; with each call's peak memory;
5. serve: the load benchmark (`bench.load`) on demo-x4, fused bf16;
6. compile: `engine.sample` compiled bf16 at batch 1 and 16 (torch.compile's default mode:
   max-autotune does not fit), last, since cold Inductor compiles of the network take the
   longest and the least predictable time;
7. report: `bench.report --print` of the benchmark files.

One deadline (BUDGET_S) holds for the whole check. Each stage gets the time left less the shares
kept for the stages after it, so a stage that finishes early passes its time on. A stage that
reaches its limit is stopped gracefully: SIGINT to its process group (pytest then writes the rows
and test results it finished), GRACE_S later SIGKILL; whatever it started (cmake, nvcc, Inductor
workers) is killed with it, so nothing runs on into the next stage. Benchmark stages select their
rows by pytest node id. `--dry-run` prints the plan (stages, selections, node-id counts, shares)
without running it.

Everything goes to `--out` (default $OUT, else gpu-check-out/): gpu-check.log (every stage's
output), gpu-tests.xml, gpu-ops.json, gpu-sample.json, gpu-compile.json, gpu-load.json,
gpu-report.md and gpu-check.json (the stages so far and the table, rewritten after every stage):
eight files. The short table is printed last. Back on a development machine, `python -m
bench.report OUT/gpu-ops.json OUT/gpu-sample.json OUT/gpu-compile.json` writes the RESULTS.md
section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from sr3_engine.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
# The machine's per-command limit is 10 minutes and the check must fit 8 with its start-up.
BUDGET_S = 480
# From SIGINT to SIGKILL: long enough for pytest to finish the call in flight and write its files.
GRACE_S = 15
# Kept for the report after the last stage, and its grace period.
REPORT_S = 20
REPORT_GRACE_S = 2
# A stage left less than this is not started.
MIN_STAGE_S = 5

CORRECTNESS_MARKERS = "(gpu or cuda) and not slow"
OPS_NODES = tuple(
    [f"bench/test_ops.py::test_group_norm_silu[{case}-channels_last-bf16-{backend}]"
     for case in ("16x64x128x128", "16x192x128x128", "1x128x1024x1024") for backend in ("native", "triton", "cpp")]
    + [f"bench/test_ops.py::test_posterior_step[32x3x512x512-seeded-{backend}]" for backend in ("triton", "cpp")])
SAMPLE_NODES = tuple(
    [f"bench/test_sample.py::test_sample[{variant}-batch{batch}]"
     for variant in ("eager-fp32", "eager-bf16", "eager-triton-bf16", "fused-bf16") for batch in (1, 16)]
    + ["bench/test_sample.py::test_sample[sr3-16-128-512px-tile128-fused-bf16-batch1]"])
COMPILE_NODES = tuple(f"bench/test_sample.py::test_sample[compile-bf16-batch{batch}]" for batch in (1, 16))
BENCH_FILES = ("gpu-ops.json", "gpu-sample.json", "gpu-compile.json")
LOAD_FILE = "gpu-load.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A command with its share of the budget: the seconds kept for it while earlier stages run.
    `collect` holds the pytest arguments that select its tests or rows (empty for other commands)."""

    name: str
    command: tuple[str, ...]
    share_s: float
    env: tuple[tuple[str, str], ...] = ()
    collect: tuple[str, ...] = ()


def stages(out: Path, python: str, install: bool) -> list[Stage]:
    pytest = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    bench = ("--device", "cuda", "--benchmark-min-rounds", "2", "--benchmark-max-time", "0.5")
    correctness = ("-m", CORRECTNESS_MARKERS, "tests")
    planned = [
        Stage("correctness", (*pytest, "--continue-on-collection-errors", "--junitxml", str(out / "gpu-tests.xml"),
                              *correctness), 60, (("SR3_ENGINE_REQUIRE_EXT", "1"),), correctness),
        Stage("ops", (*pytest, *bench, "--benchmark-json", str(out / "gpu-ops.json"), *OPS_NODES), 30,
              collect=("--device", "cuda", *OPS_NODES)),
        Stage("sample", (*pytest, *bench, "--benchmark-json", str(out / "gpu-sample.json"), *SAMPLE_NODES), 120,
              collect=("--device", "cuda", *SAMPLE_NODES)),
        Stage("serve", (python, "-m", "bench.load", "--device", "cuda", "--seconds", "8",
                        "--rounds", "5", "--json", str(out / LOAD_FILE)), 45),
        Stage("compile", (*pytest, *bench, "--compile-mode", "default", "--benchmark-json",
                          str(out / "gpu-compile.json"), *COMPILE_NODES), 75,
              collect=("--device", "cuda", *COMPILE_NODES)),
    ]
    if install:
        planned.insert(0, Stage("install", (python, "-m", "bench.offline_install"), 130))
    return planned


def run_stage(stage: Stage, log, limit_s: float, grace_s: float = GRACE_S, stdout=None) -> dict:
    """Run `stage` in a process group of its own for at most `limit_s`; then SIGINT to the group,
    and SIGKILL after `grace_s` more. Output goes to `stdout` (default: the log). Whatever the
    stage left running is killed when it ends."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(stage.env)
    log.write(f"\n===== {stage.name} (limit {limit_s:.0f} s): {' '.join(stage.command)}\n")
    log.flush()
    started = time.perf_counter()
    process = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=stdout or log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_default_sigint)
    result = {"stage": stage.name, "limit_s": round(limit_s, 1)}
    try:
        result["exit"] = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        result.update(_stop(process, grace_s))
    except KeyboardInterrupt:
        _stop(process, grace_s)
        raise
    finally:
        _signal_group(process.pid, signal.SIGKILL)
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.write(f"===== {stage.name}: exit {result['exit']} after {result['seconds']:.0f} s"
              + (f" ({result['stopped']})" if "stopped" in result else "") + "\n")
    log.flush()
    return result


def _default_sigint() -> None:
    """In the stage's process before it starts: SIGINT back to its default. An ignored SIGINT is
    inherited across exec (a job started with & from a script has it), and Python then keeps
    ignoring it, so the graceful stop would find nothing listening."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(process: subprocess.Popen, grace_s: float) -> dict:
    _signal_group(process.pid, signal.SIGINT)
    try:
        return {"exit": process.wait(timeout=grace_s), "stopped": "SIGINT at its limit"}
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        return {"exit": process.wait(), "stopped": f"SIGKILL {grace_s:g} s after SIGINT"}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group has ended


def table(out: Path) -> list[str]:
    """One line per benchmark row in the JSON files that exist under `out`."""
    lines = []
    for name in BENCH_FILES:
        document = _read_json(out / name, lines)
        for row in document.get("benchmarks", []):
            info, median = row.get("extra_info", {}), row.get("stats", {}).get("median")
            if median is None:
                continue
            if info.get("kind") == "op":
                lines.append(f"{row['name']:<62} {median * 1e6:10.1f} us  {info.get('gbps', 0):8.0f} GB/s  "
                             f"{info.get('bandwidth_fraction', 0):6.1%} of peak")
            else:
                peak = info.get("peak_memory_bytes")
                mode = info.get("compile_mode")
                lines.append(f"{row['name']:<62} {median:10.3f} s   {info.get('images_per_s', 0):8.2f} img/s  "
                             f"{info.get('roofline_fraction', 0):6.1%} roofline"
                             + (f"  peak {peak / 2**30:.2f} GiB" if peak is not None else "")
                             + (f"  mode {mode}" if mode else ""))
    result = _read_json(out / LOAD_FILE, lines)
    for scenario, modes in result.get("scenarios", {}).items():
        lines.append(f"load {scenario}: " + ", ".join(f"{mode} {row['throughput_mp_s']:.2f} MP/s"
                                                      for mode, row in modes.items()))
    lines += [f"load {name}: {value}" for name, value in result.get("figures", {}).items()]
    return lines


def _read_json(path: Path, lines: list[str]) -> dict:
    """The JSON document at `path`, or {} with a line saying why not (a stage killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        lines.append(f"{path.name}: missing (its stage did not finish)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        lines.append(f"{path.name}: unreadable ({error})")
    return {}


def write_summary(out: Path, results: list[dict], plan: list[Stage], budget_s: float) -> list[str]:
    """gpu-check.json as it stands (rewritten whole after every stage); the table's lines."""
    lines = table(out)
    summary = {"budget_s": budget_s, "plan": [{"stage": s.name, "share_s": s.share_s} for s in plan],
               "stages": results, "table": lines}
    with atomic_path(out / "gpu-check.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return lines


def run_check(plan: list[Stage], out: Path, python: str, *, budget_s: float = BUDGET_S, grace_s: float = GRACE_S,
              report_s: float = REPORT_S, min_stage_s: float = MIN_STAGE_S) -> int:
    """Run `plan` against one deadline, then the report; 0 when every stage exited 0. A stage's
    limit leaves room for its grace period, so its share includes that."""
    clock = time.monotonic
    deadline = clock() + budget_s
    results: list[dict] = []
    with open(out / "gpu-check.log", "w") as log:
        try:
            for index, stage in enumerate(plan):
                kept = sum(later.share_s for later in plan[index + 1:]) + report_s
                limit = deadline - clock() - kept - grace_s
                if limit < min_stage_s:
                    results.append({"stage": stage.name, "exit": "not started", "seconds": 0,
                                    "limit_s": round(limit, 1)})
                else:
                    results.append(run_stage(stage, log, limit, grace_s))
                result = results[-1]
                print(f"{stage.name}: exit {result['exit']} after {result['seconds']:.0f} s of "
                      f"{result['limit_s']:.0f}" + (f" ({result['stopped']})" if "stopped" in result else ""),
                      flush=True)
                write_summary(out, results, plan, budget_s)
        except KeyboardInterrupt:
            write_summary(out, results, plan, budget_s)
            print("gpu-check: interrupted; the stages so far are in gpu-check.json", flush=True)
            return 130
        inputs = [str(out / name) for name in BENCH_FILES if (out / name).is_file()]
        if inputs:
            report = Stage("report", (python, "-m", "bench.report", *inputs, "--print"), report_s)
            with open(out / "gpu-report.md", "w") as report_file:
                # What is left, for a short job that writes nothing of its own but this file.
                limit = max(min_stage_s, deadline - clock() - REPORT_GRACE_S)
                results.append(run_stage(report, log, limit, REPORT_GRACE_S, stdout=report_file))
    lines = write_summary(out, results, plan, budget_s)
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in results) else 1


def collect(python: str, arguments: Sequence[str]) -> tuple[list[str], str]:
    """The node ids pytest collects for `arguments` here (with the benchmarks' `--device cuda`
    allowed without a GPU), and pytest's error output when it collects with errors."""
    done = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *arguments],
                          cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in done.stdout.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]
    return ids, "" if done.returncode == 0 else (done.stdout + done.stderr).strip()[-2000:]


def print_plan(plan: list[Stage], python: str, budget_s: float) -> int:
    """The dry run: each stage, its share of the budget, its command and how many node ids it selects."""
    print(f"gpu-check plan: {len(plan)} stages and the report within {budget_s:.0f} s (one deadline; a stage "
          f"gets what is left less the shares after it; SIGINT at its limit, SIGKILL {GRACE_S} s later)")
    status = 0
    for stage in plan:
        selected = "-"
        if stage.collect:
            ids, errors = collect(python, stage.collect)
            selected = f"{len(ids)} node ids"
            if errors:
                selected += f" (collection failed: {errors.splitlines()[-1]})"
                status = 1
        print(f"  {stage.name:<12} share {stage.share_s:>4.0f} s  {selected}")
        print(f"      {shlex.join(stage.command)}")
    print(f"  {'report':<12} share {REPORT_S:>4.0f} s")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"),
                        help="results folder (default: $OUT, else gpu-check-out/)")
    parser.add_argument("--no-install", dest="install", action="store_false", help="skip the editable install")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every stage")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole check ({BUDGET_S})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the node ids it selects; run nothing")
    args = parser.parse_args(argv)
    plan = stages(args.out.resolve(), args.python, args.install)
    if args.dry_run:
        return print_plan(plan, args.python, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    return run_check(plan, args.out, args.python, budget_s=args.budget)


if __name__ == "__main__":
    raise SystemExit(main())
