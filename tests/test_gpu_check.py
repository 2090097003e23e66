"""`make gpu-check` (bench/gpu_check.py), in the parts that run without a GPU: the plan of stages,
how a stage runs, the time budget, and the table and files made from recorded results."""

import json
import sys

import pytest

from bench import gpu_check

from .test_bench import _document


def test_the_stages_fit_the_time_budget_and_install_first(tmp_path):
    planned = gpu_check.stages(tmp_path, "python3", install=True)
    assert [s.name for s in planned] == ["install", "correctness", "ops", "sample", "compile", "serve"]
    assert sum(s.timeout_s for s in planned) <= gpu_check.BUDGET_S <= 8 * 60
    install = dict(planned[0].env)
    assert install["SR3_ENGINE_REQUIRE_EXT"] == "1" and "CMAKE_CUDA_ARCHITECTURES=90" in install["CMAKE_ARGS"]
    assert "--no-deps" in planned[0].command and "--no-build-isolation" in planned[0].command
    assert [s.name for s in gpu_check.stages(tmp_path, "python3", install=False)][0] == "correctness"
    compile_stage = next(s for s in planned if s.name == "compile").command
    assert compile_stage[compile_stage.index("--compile-mode") + 1] == "default"
    assert all(str(tmp_path) in " ".join(s.command) for s in planned[1:])


def test_a_stage_runs_without_the_interpreter_and_within_its_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        shown = gpu_check.run_stage(gpu_check.Stage("env", (sys.executable, "-c", "import os; print("
                                                              "os.environ.get('TRITON_INTERPRET'))"), 60), log)
        slow = gpu_check.run_stage(gpu_check.Stage("slow", (sys.executable, "-c", "import time; time.sleep(30)"), 1),
                                   log)
    assert shown["exit"] == 0 and "\nNone\n" in log_path.read_text()
    assert slow["exit"] == "timeout" and slow["seconds"] < 10


def test_results_become_a_table_report_and_at_most_eight_files(tmp_path, monkeypatch, capsys):
    document = _document()
    ops = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "op"]}
    sample = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "sample"]}
    sample["benchmarks"][0]["extra_info"]["peak_memory_bytes"] = 3 * 2**30
    files = {"gpu-ops.json": ops, "gpu-sample.json": sample}
    # Stages that stand in for the GPU work: each writes its recorded file.
    fake = [gpu_check.Stage(name, (sys.executable, "-c", f"open({str(tmp_path / name)!r}, 'w').write("
                                   f"{json.dumps(json.dumps(data))})"), 60) for name, data in files.items()]
    monkeypatch.setattr(gpu_check, "stages", lambda out, python, install: fake)
    assert gpu_check.main(["--out", str(tmp_path), "--no-install"]) == 0
    out = capsys.readouterr().out
    assert "test_group_norm_silu[triton]" in out and "GB/s" in out and "peak 3.00 GiB" in out
    assert "gpu-compile.json: missing" in out
    assert (tmp_path / "gpu-report.md").read_text().strip()
    assert len(list(tmp_path.iterdir())) <= 8
    assert json.loads((tmp_path / "gpu-check.json").read_text())["stages"][0]["exit"] == 0


def test_out_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "from-env"))
    monkeypatch.setattr(gpu_check, "stages", lambda out, python, install: [])
    assert gpu_check.main([]) == 0
    assert (tmp_path / "from-env" / "gpu-check.json").is_file()


@pytest.mark.parametrize("selection", [gpu_check.OPS_SELECTION, gpu_check.SAMPLE_SELECTION,
                                       gpu_check.COMPILE_SELECTION])
def test_selections_are_valid_keyword_expressions(selection):
    from _pytest.mark.expression import Expression

    Expression.compile(selection)


def test_every_gpu_marked_test_runs_in_the_correctness_stage():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in sorted((root / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            marked = isinstance(node, ast.FunctionDef) and any(
                ast.unparse(decorator) == "pytest.mark.gpu" for decorator in node.decorator_list)
            name = f"tests/{path.name}"
            if marked and name not in gpu_check.CORRECTNESS_TESTS and f"{name}::{node.name}" not in \
                    gpu_check.CORRECTNESS_TESTS:
                missing.append(f"{name}::{node.name}")
    assert missing == []
