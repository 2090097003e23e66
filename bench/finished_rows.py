"""A pytest plugin of the benchmark suite (its conftest imports the hook): pytest-benchmark's JSON
keeps the rows that finished when a run is stopped with SIGINT, as gpu-check stops a stage at its
limit. Without it, the interrupted benchmark, registered with no timings, fails the whole file.
It imports neither torch nor the engine, so that a stand-in run (tests/test_gpu_check.py) can
load it alone with `-p bench.finished_rows`."""

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Keep only the rows that finished before pytest-benchmark writes its JSON: dropped are the
    interrupted benchmark, which has no timings, and one timed but not yet recorded (no `kind`
    in its extra_info), which the report cannot read."""
    benchmarks = getattr(session.config, "_benchmarksession", None)
    if benchmarks is not None:
        benchmarks.benchmarks[:] = [row for row in benchmarks.benchmarks if row and "kind" in row.extra_info]
    return (yield)
