"""`make gpu-check` (bench/gpu_check.py), in the parts that run without a GPU: the plan and its
node ids, the stage machinery rehearsed with stand-in stages (one deadline, graceful stops that
keep finished rows, nothing left running), the offline install, and the table and files made
from recorded results."""

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import gpu_check, offline_install

from .test_bench import _document

STAGE_NAMES = ["install", "correctness", "ops", "sample", "serve", "compile"]


def test_the_plan_fits_the_budget_with_install_first_and_compile_last(tmp_path):
    planned = gpu_check.stages(tmp_path, "python3", install=True)
    assert [s.name for s in planned] == STAGE_NAMES
    assert sum(s.share_s for s in planned) + gpu_check.REPORT_S == gpu_check.BUDGET_S <= 8 * 60
    assert planned[0].command == ("python3", "-m", "bench.offline_install")
    assert [s.name for s in gpu_check.stages(tmp_path, "python3", install=False)] == STAGE_NAMES[1:]
    by_name = {s.name: s for s in planned}
    correctness = by_name["correctness"]
    assert dict(correctness.env) == {"SR3_ENGINE_REQUIRE_EXT": "1"}
    assert "--continue-on-collection-errors" in correctness.command
    assert correctness.command[-3:] == ("-m", gpu_check.CORRECTNESS_MARKERS, "tests")
    compile_stage = by_name["compile"].command
    assert compile_stage[compile_stage.index("--compile-mode") + 1] == "default"
    for name, nodes in (("ops", gpu_check.OPS_NODES), ("sample", gpu_check.SAMPLE_NODES),
                        ("compile", gpu_check.COMPILE_NODES)):
        assert by_name[name].command[-len(nodes):] == nodes and "-k" not in by_name[name].command
        assert by_name[name].collect == ("--device", "cuda", *nodes)
    assert all(str(tmp_path) in " ".join(s.command) for s in planned[1:])


def test_each_benchmark_stage_collects_exactly_its_node_ids():
    for nodes in (gpu_check.OPS_NODES, gpu_check.SAMPLE_NODES, gpu_check.COMPILE_NODES):
        ids, errors = gpu_check.collect(sys.executable, ("--device", "cuda", *nodes))
        assert errors == "" and ids == list(nodes)
    assert not any("test_step" in node for node in gpu_check.SAMPLE_NODES + gpu_check.COMPILE_NODES)
    assert any("tile" in node and "fused" in node for node in gpu_check.SAMPLE_NODES)
    eager = [node for node in gpu_check.SAMPLE_NODES if "[eager-" in node]
    assert {node.split("[")[1].rsplit("-batch", 1)[0] for node in eager} == {"eager-fp32", "eager-bf16",
                                                                           "eager-triton-bf16"}


def test_the_correctness_stage_selects_gpu_work_only():
    ids, errors = gpu_check.collect(sys.executable, ("-m", gpu_check.CORRECTNESS_MARKERS, "tests"))
    assert errors == "" and ids
    gpu_marked, _ = gpu_check.collect(sys.executable, ("-m", "gpu and not slow", "tests"))
    assert gpu_marked and set(gpu_marked) <= set(ids)
    assert "tests/test_tiling.py::test_fused_tiles_on_cuda_replay_one_captured_denoiser_and_match_eager" in ids
    # The op tests' Triton cases (on CUDA tensors there), and none of their CPU cases.
    op_cases = [node for node in ids if node.startswith("tests/test_ops.py::")]
    assert op_cases and all("triton" in node for node in op_cases)
    assert any(node.startswith("tests/test_ops.py::test_posterior_step_with_given_noise[") for node in op_cases)
    # The Triton kernels' own tests, but no compile check: CI runs those without a GPU.
    assert any(node.startswith("tests/test_kernels.py::test_split_reduction_matches_the_reference") for node in ids)
    assert not [node for node in ids if "compile" in node.split("::")[1] and "check" in node.split("::")[1]]
    assert not [node for node in ids if "test_cuda_sources_compile" in node or "compile_for_hopper" in node]
    assert not [node for node in ids if "test_plan_" in node]  # the split planner is CPU arithmetic


# --------------------------------------------------------------------------- rehearsal with stand-in stages

STAND_IN_BENCHMARKS = '''
import time

def _row(benchmark):
    benchmark.extra_info["kind"] = "op"

def test_first(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=2)
    _row(benchmark)

def test_second(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=2)
    _row(benchmark)

def test_never_finishes(benchmark):
    benchmark.pedantic(time.sleep, args=(600,), rounds=1)
    _row(benchmark)
'''


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has not read its status


def test_an_overrun_stage_keeps_its_finished_rows_and_test_results(tmp_path):
    # As gpu-check started in the background of a script would have it: SIGINT ignored, which its
    # stages would inherit.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _overrun_stage_keeps_its_finished_rows(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _overrun_stage_keeps_its_finished_rows(tmp_path):
    (tmp_path / "test_stand_in.py").write_text(STAND_IN_BENCHMARKS)
    out = tmp_path / "out"
    out.mkdir()
    # The benchmark suite's plugin that keeps the finished rows at a stop (its conftest loads it).
    stage = gpu_check.Stage("ops", (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                                    "bench.finished_rows", "--benchmark-json", str(out / "gpu-ops.json"),
                                    "--junitxml", str(out / "gpu-tests.xml"), str(tmp_path / "test_stand_in.py")), 20)
    started = time.monotonic()
    code = gpu_check.run_check([stage], out, sys.executable, budget_s=30, grace_s=10, report_s=0)
    assert time.monotonic() - started < 35
    result = json.loads((out / "gpu-check.json").read_text())["stages"][0]
    assert code == 1 and result["stopped"] == "SIGINT at its limit" and result["exit"] != 0
    rows = json.loads((out / "gpu-ops.json").read_text())["benchmarks"]
    assert [row["name"] for row in rows] == ["test_first", "test_second"]
    junit = (out / "gpu-tests.xml").read_text()
    assert 'name="test_first"' in junit and 'name="test_second"' in junit
    assert any(line.startswith("test_first") for line in gpu_check.table(out))


def test_one_deadline_passes_unused_time_on_and_keeps_the_shares_of_later_stages(tmp_path):
    grandchild = tmp_path / "grandchild.pid"
    plan = [
        gpu_check.Stage("quick", _python("pass"), 3),
        # Ignores SIGINT and leaves a process of its own running: both must be killed.
        gpu_check.Stage("hog", _python(f"""
            import signal, subprocess, sys, time
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(grandchild)!r}, "w").write(str(child.pid))
            time.sleep(600)
            """), 4),
        # Sees the summary as it stood after the stages before it.
        gpu_check.Stage("last", _python(f"""
            import shutil
            shutil.copy({str(tmp_path / 'gpu-check.json')!r}, {str(tmp_path / 'seen.json')!r})
            """), 4),
    ]
    started = time.monotonic()
    code = gpu_check.run_check(plan, tmp_path, sys.executable, budget_s=14, grace_s=1, report_s=1, min_stage_s=1)
    elapsed = time.monotonic() - started
    results = {r["stage"]: r for r in json.loads((tmp_path / "gpu-check.json").read_text())["stages"]}
    assert code == 1 and elapsed < 14 + 1
    assert results["quick"]["exit"] == 0 and results["quick"]["limit_s"] <= 14 - (4 + 4 + 1) - 1 + 0.1
    # The hog was given what the quick stage left, beyond its own share, and no more than the
    # others' shares allow; then SIGINT, ignored, and SIGKILL a grace period later.
    assert 4 < results["hog"]["limit_s"] <= 14 - (4 + 1) - 1 + 0.1
    assert results["hog"]["stopped"] == "SIGKILL 1 s after SIGINT"
    assert not _alive(int(grandchild.read_text()))
    assert results["last"]["exit"] == 0 and results["last"]["limit_s"] >= 4 - 1 - 1 - 0.5
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert [r["stage"] for r in seen["stages"]] == ["quick", "hog"]


def test_a_stage_runs_without_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        shown = gpu_check.run_stage(gpu_check.Stage("env", _python("import os; print(os.environ.get("
                                                                   "'TRITON_INTERPRET'))"), 60), log, 60)
    assert shown["exit"] == 0 and "\nNone\n" in log_path.read_text()


def test_a_stage_without_time_left_is_not_started(tmp_path):
    plan = [gpu_check.Stage("first", _python("pass"), 10), gpu_check.Stage("second", _python("pass"), 10)]
    assert gpu_check.run_check(plan, tmp_path, sys.executable, budget_s=5, grace_s=1, report_s=0, min_stage_s=1) == 1
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert [r["exit"] for r in stages] == ["not started", 0]


# --------------------------------------------------------------------------- the install stage

def test_install_is_offline_and_retries_without_the_extension(monkeypatch, capsys):
    calls = []

    def call(command, cwd, env):
        calls.append((command, env))
        return 1 if len(calls) == 1 else 0

    monkeypatch.setattr(offline_install.subprocess, "call", call)
    monkeypatch.setattr(offline_install, "missing_build_tools", lambda: [])
    assert offline_install.main([]) == 1
    (first, first_env), (second, second_env) = calls
    assert first == second and {"--no-index", "--no-deps", "--no-build-isolation", "-e"} <= set(first)
    for env in (first_env, second_env):
        assert env["PIP_NO_INDEX"] == env["PIP_DISABLE_PIP_VERSION_CHECK"] == env["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    assert first_env["SR3_ENGINE_REQUIRE_EXT"] == "1" and "CMAKE_CUDA_ARCHITECTURES=90" in first_env["CMAKE_ARGS"]
    assert second_env["SR3_ENGINE_SKIP_EXT"] == "1" and "SR3_ENGINE_REQUIRE_EXT" not in second_env
    assert "its build failed (pip exit 1" in capsys.readouterr().out


def test_install_names_missing_build_tools_and_installs_without_the_extension(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(offline_install.subprocess, "call", lambda command, cwd, env: calls.append(env) or 0)
    monkeypatch.setattr(offline_install.shutil, "which", lambda name: None)
    monkeypatch.setattr(offline_install.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert offline_install.main([]) == 1
    out = capsys.readouterr().out
    assert "no C++ compiler" in out and "no Python headers" in out and "python3-dev" in out
    assert len(calls) == 1 and calls[0]["SR3_ENGINE_SKIP_EXT"] == "1"


def test_install_succeeds_with_the_extension(monkeypatch):
    monkeypatch.setattr(offline_install.subprocess, "call", lambda command, cwd, env: 0)
    monkeypatch.setattr(offline_install, "missing_build_tools", lambda: [])
    assert offline_install.main([]) == 0


# --------------------------------------------------------------------------- results, files, dry run

def test_results_become_a_table_report_and_at_most_eight_files(tmp_path, monkeypatch, capsys):
    document = _document()
    ops = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "op"]}
    sample = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "sample"]}
    sample["benchmarks"][0]["extra_info"]["peak_memory_bytes"] = 3 * 2**30
    files = {"gpu-ops.json": ops, "gpu-sample.json": sample}
    # Stages that stand in for the GPU work: each writes its recorded file; the load file is cut short.
    fake = [gpu_check.Stage(name, _python(f"open({str(tmp_path / name)!r}, 'w').write({json.dumps(json.dumps(data))})"),
                            60) for name, data in files.items()]
    fake.append(gpu_check.Stage("serve", _python(f"open({str(tmp_path / gpu_check.LOAD_FILE)!r}, 'w').write('{{')"),
                                60))
    monkeypatch.setattr(gpu_check, "stages", lambda out, python, install: fake)
    assert gpu_check.main(["--out", str(tmp_path), "--no-install"]) == 0
    out = capsys.readouterr().out
    assert "test_group_norm_silu[triton]" in out and "GB/s" in out and "peak 3.00 GiB" in out
    assert "gpu-compile.json: missing" in out and "gpu-load.json: unreadable" in out
    assert (tmp_path / "gpu-report.md").read_text().strip()
    assert len(list(tmp_path.iterdir())) <= 8
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["gpu-ops.json", "gpu-sample.json", "serve", "report"]
    assert all(r["exit"] == 0 for r in summary["stages"])


def test_out_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "from-env"))
    monkeypatch.setattr(gpu_check, "stages", lambda out, python, install: [])
    assert gpu_check.main([]) == 0
    assert (tmp_path / "from-env" / "gpu-check.json").is_file()


def test_the_dry_run_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    collected = []
    monkeypatch.setattr(gpu_check, "collect", lambda python, arguments: collected.append(arguments) or
                        (["a::b"] * len(arguments), ""))
    monkeypatch.setattr(gpu_check, "run_stage", lambda *args, **kwargs: pytest.fail("the dry run ran a stage"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    for name in STAGE_NAMES + ["report"]:
        assert f"  {name} " in out
    assert f"{len(gpu_check.SAMPLE_NODES) + 2} node ids" in out and "share  120 s" in out
    assert len(collected) == 4 and "480 s" in out
