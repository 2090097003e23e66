"""Shared set-up of the benchmark suite: the device, its peaks, the engines, the clock.

`pytest bench/` measures on CUDA when there is a GPU, else on the CPU (`--device` picks).
The problem follows the device: sr3-16-128 at 16x16 -> 128x128 (x8) on CUDA, the tiny
config at 8x8 -> 32x32 (x4) on the CPU, so that the CPU suite (`make bench`) fits in a few
minutes. Engines are built once per session and shared by the per-step and end-to-end
benchmarks; an engine backend that cannot run here is skipped with its reason, which the
JSON keeps (`sr3_skipped`) so that the report can list it.
"""

from __future__ import annotations

import shlex

import pytest
import torch

import sr3_engine as sr3
from sr3_engine.runtime.backends import BackendUnavailableError

from . import harness
from .finished_rows import pytest_sessionfinish  # noqa: F401 (a hook: pytest finds it here)
from .harness import PROBLEMS, VARIANTS, Problem, Variant

# Skipped benchmarks and their reasons, for the JSON (pytest-benchmark only records those that ran).
_skipped: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("sr3_engine benchmarks")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where to measure (auto: cuda when available)")
    group.addoption("--peak-fp32-tflops", type=float, default=None,
                    help="the device's dense fp32 peak in TFLOP/s (TF32 where cuDNN uses it), instead of the data "
                    "sheet or a measurement")
    group.addoption("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak in TFLOP/s, instead of the data sheet or a measurement")
    group.addoption("--peak-gbps", type=float, default=None,
                    help="the device's memory bandwidth in GB/s, instead of the data sheet or a measurement")
    group.addoption("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of the compile variants instead of theirs (max-autotune on CUDA)")


def pytest_configure(config):
    try:
        # Collecting runs nothing: a CPU machine may list a GPU run's rows (gpu-check's plan does).
        device = harness.resolve_device(config.getoption("--device"), collect_only=config.option.collectonly)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    config._sr3_device = device
    config.addinivalue_line("markers", "whole_images: runs the suite's untiled problems only")
    config._sr3_clock = harness.clock_for(device)


def pytest_collection_modifyitems(config, items):
    marker_options = {"warmup": True, "warmup_iterations": 10, "timer": config._sr3_clock}
    for item in items:
        item.add_marker(pytest.mark.benchmark(**marker_options))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        backend = params["variant"].id if "variant" in params else params.get("backend", "")
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"test": item.originalname, "case": item.callspec.id if params else "", "backend": backend,
                         "reason": reason.removeprefix("Skipped: ")})
    return report


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["sr3_command"] = shlex.join(["python", "-m", "pytest", *config.invocation_params.args])
    output_json["sr3_skipped"] = list(_skipped)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return pytestconfig._sr3_device


@pytest.fixture(scope="session")
def clock(pytestconfig):
    """The benchmarks' timer, for measurements made beside pytest-benchmark's."""
    return pytestconfig._sr3_clock


@pytest.fixture(scope="session")
def device_info(pytestconfig, device) -> harness.DeviceInfo:
    return harness.describe(device, pytestconfig.getoption("--peak-tflops"), pytestconfig.getoption("--peak-gbps"),
                            pytestconfig.getoption("--peak-fp32-tflops"))


@pytest.fixture(scope="session")
def rounds(pytestconfig) -> int:
    """Timed rounds of a whole-sampling benchmark (--benchmark-min-rounds; one warm-up round precedes them)."""
    return max(1, int(pytestconfig.getoption("benchmark_min_rounds")))


@pytest.fixture(scope="session")
def engines(pytestconfig, device):
    """(problem, variant) -> SR3Engine, built on first use; skips with the reason when the backend
    cannot run here."""
    built: dict[tuple[str, str], sr3.SR3Engine | str] = {}
    compile_mode = pytestconfig.getoption("--compile-mode")

    def get(variant: Variant, problem: Problem) -> sr3.SR3Engine:
        key = (problem.config, variant.id)
        if key not in built:
            variant = variant.with_compile_mode(compile_mode)
            try:
                built[key] = harness.build_engine(variant, problem, device)
            except BackendUnavailableError as error:
                built[key] = str(error)
        engine = built[key]
        if isinstance(engine, str):
            pytest.skip(engine)
        return engine

    yield get
    built.clear()  # drop the engines (and their weights and graphs) before handing memory back to the driver
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pytest_generate_tests(metafunc):
    """End-to-end and per-step benchmarks run every (problem, variant, batch) the device's problems
    name; the cases of the device's first problem keep the plain id `variant-batchN`, those of
    the others are prefixed with the problem's label (its model, and its size and tile when tiled).
    A benchmark marked `whole_images` runs the untiled problems only."""
    device = metafunc.config._sr3_device.type
    if {"problem", "variant", "batch"} <= set(metafunc.fixturenames):
        whole_only = metafunc.definition.get_closest_marker("whole_images") is not None
        cases, ids = [], []
        for index, problem in enumerate(PROBLEMS[device]):
            if whole_only and problem.tile is not None:
                continue
            for variant in filter(problem.measures, VARIANTS[device]):
                for batch in problem.batches:
                    cases.append((problem, variant, batch))
                    ids.append(("" if index == 0 else f"{problem.label}-") + f"{variant.id}-batch{batch}")
        metafunc.parametrize("problem, variant, batch", cases, ids=ids)
