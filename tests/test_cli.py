"""`python -m sr3_engine <command>`: one command line, and the module entry points that call the same commands."""

import subprocess
import sys
from pathlib import Path

import pytest

from sr3_engine.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("upscale", "train", "distill", "evaluate", "export", "convert", "demo", "serve"):
        assert f"  {name} " in out
    assert set(COMMANDS) == {"upscale", "train", "distill", "evaluate", "export", "convert", "demo", "serve"}


def test_an_unknown_command_is_a_usage_error(capsys):
    assert main(["enhance"]) == 2
    assert "invalid choice: 'enhance'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["upscale", "train", "evaluate", "export", "convert", "demo"])
def test_each_command_has_its_own_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert f"python -m sr3_engine {name}" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["sr3_engine", "demo"], ["sr3_engine.demo"], ["sr3_engine.train"],
                                     ["sr3_engine.evaluate"], ["sr3_engine.export"]])
def test_the_module_entry_points_run_the_same_commands(command):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"python -m sr3_engine {command[-1].split('.')[-1]}" in result.stdout


@pytest.mark.parametrize("argv", [["upscale", "x.png", "-o", "out", "--model", "m", "--dtype", "float32"],
                                  ["evaluate", "--model", "m", "--data", ".", "--scale", "4", "--dtype", "float16"],
                                  ["export", "--model", "m", "--onnx", "x.onnx", "--dtype", "bfloat16"]])
def test_one_spelling_of_precisions(argv, capsys):
    assert main(argv) == 2
    assert "choose from 'fp32', 'fp16', 'bf16'" in capsys.readouterr().err


def test_one_device_parser():
    from sr3_engine.cli.common import UsageError, parse_device

    assert str(parse_device("cpu")) == "cpu"
    with pytest.raises(UsageError, match="--device gpu0: not a torch device"):
        parse_device("gpu0")
