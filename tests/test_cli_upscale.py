"""`python -m sr3_engine upscale`: bad inputs cost one line each, never the run; exit codes 0/1/2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3
from sr3_engine.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    engine = sr3.SR3Engine(model, schedule=sr3.NoiseSchedule.linear(8, 1e-4, 0.1), scale=SCALE, progress=False)
    return engine.save_pretrained(tmp_path_factory.mktemp("model"))


def _save_rgb(path: Path, width=12, height=8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _upscale(model_dir: Path, *args) -> int:
    return main(["upscale", *map(str, args), "--model", str(model_dir), "--steps", "2", "--no-progress"])


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _make_mixed_folder(folder: Path) -> tuple[dict[str, tuple[tuple[int, int], str]], list[str]]:
    """Good images (name -> (expected output size, mode)) and bad files (names)."""
    folder.mkdir()
    _save_rgb(folder / "good.png", 12, 8)
    Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10) * 3, mode="L").save(folder / "gray.png")
    rgba = np.random.default_rng(1).integers(0, 256, (16, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)).save(folder / "deep.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(300))
    _save_rgb(folder / "whole.jpg", 32, 32)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    good = {"good": ((24, 16), "RGB"), "gray": ((20, 16), "RGB"), "alpha": ((16, 32), "RGBA"),
            "deep": ((16, 16), "RGB")}
    return good, ["corrupt.png", "truncated.jpg", "text.png"]


def test_folder_with_bad_files(tmp_path, model_dir):
    good, bad = _make_mixed_folder(tmp_path / "in")
    outdir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sr3_engine", "upscale", str(tmp_path / "in"), "-o", str(outdir),
         "--model", str(model_dir), "--steps", "2", "--batch-size", "2"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == len(bad)
    for name in bad:
        assert sum(f"error: {tmp_path / 'in' / name}: " in line for line in errors) == 1
    assert sorted(os.listdir(outdir)) == sorted(f"{stem}.png" for stem in good)
    for stem, (size, mode) in good.items():
        with Image.open(outdir / f"{stem}.png") as image:
            assert (image.size, image.mode) == (size, mode), stem
    with Image.open(outdir / "alpha.png") as image:
        assert set(np.asarray(image)[..., 3].ravel().tolist()) == {128}
    assert result.stdout.strip() == f"4 written to {outdir}, 3 failed"


def test_all_good_exits_0(tmp_path, model_dir, capsys):
    _save_rgb(tmp_path / "a.png")
    _save_rgb(tmp_path / "b.png", 8, 8)
    assert _upscale(model_dir, tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    assert capsys.readouterr().out.strip() == f"2 written to {tmp_path / 'out'}, 0 failed"


def test_rerun_into_an_output_folder_inside_the_input_folder(tmp_path, model_dir):
    _save_rgb(tmp_path / "a.png")
    for _ in range(2):
        assert _upscale(model_dir, tmp_path, "-o", tmp_path / "out") == 0
    assert os.listdir(tmp_path / "out") == ["a.png"]


def test_shared_stems_are_disambiguated_and_announced(tmp_path, model_dir, capsys):
    first = _save_rgb(tmp_path / "p" / "x.png")
    second = _save_rgb(tmp_path / "q" / "x.png", seed=1)
    assert _upscale(model_dir, first, second, "-o", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["x-2.png", "x.png"]
    assert f"note: {second} is written as {tmp_path / 'out' / 'x-2.png'}" in capsys.readouterr().err


def test_same_seed_same_output_and_independent_of_other_images(tmp_path, model_dir):
    image = _save_rgb(tmp_path / "in" / "a.png")
    _save_rgb(tmp_path / "in" / "b.png", seed=1)
    for run, inputs, seed in (("alone", [image], 0), ("folder", [tmp_path / "in"], 0), ("seed1", [image], 1)):
        assert _upscale(model_dir, *inputs, "-o", tmp_path / run, "--batch-size", "1", "--seed", seed) == 0
    pixels = {run: np.asarray(Image.open(tmp_path / run / "a.png")) for run in ("alone", "folder", "seed1")}
    assert np.array_equal(pixels["alone"], pixels["folder"])
    assert not np.array_equal(pixels["alone"], pixels["seed1"])


def test_ddim_and_bfloat16(tmp_path, model_dir):
    _save_rgb(tmp_path / "a.png")
    assert _upscale(model_dir, tmp_path / "a.png", "-o", tmp_path / "out", "--sampler", "ddim",
                    "--dtype", "bf16") == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (24, 16)


def test_image_over_max_pixels_fails_alone(tmp_path, model_dir, capsys):
    small = _save_rgb(tmp_path / "small.png", 8, 8)
    big = _save_rgb(tmp_path / "big.png", 16, 16)
    assert _upscale(model_dir, small, big, "-o", tmp_path / "out", "--max-pixels", "100") == 1
    assert _error_lines(capsys.readouterr().err) == [
        f"error: {big}: larger than the limit of 100 pixels (decompression-bomb guard)"]
    assert os.listdir(tmp_path / "out") == ["small.png"]


def test_sampling_failure_fails_the_batch_not_the_run(tmp_path, model_dir, capsys, monkeypatch):
    _save_rgb(tmp_path / "a.png", 8, 8)
    _save_rgb(tmp_path / "b.png", 8, 8, seed=1)
    _save_rgb(tmp_path / "c.png", 12, 8)
    real_upscale = sr3.SR3Engine.upscale

    def upscale(self, images, **kwargs):
        if images[0].size == (8, 8):
            raise FloatingPointError("sampling produced NaN/Inf at step 1 of 2")
        return real_upscale(self, images, **kwargs)

    monkeypatch.setattr(sr3.SR3Engine, "upscale", upscale)
    assert _upscale(model_dir, tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png",
                    "-o", tmp_path / "out") == 1
    errors = _error_lines(capsys.readouterr().err)
    assert errors == [f"error: {tmp_path / name}: sampling failed (sampling produced NaN/Inf at step 1 of 2)"
                      for name in ("a.png", "b.png")]
    assert os.listdir(tmp_path / "out") == ["c.png"]


@pytest.mark.parametrize("case, message", [
    ("no inputs", "the following arguments are required: IN"),
    ("missing model", "error: {tmp}/nowhere: not a model directory and not a bundled model"),
    ("missing input", "error: {tmp}/gone.png: no such file or directory"),
    ("empty folder", "error: no images found in {tmp}/empty"),
    ("too many steps", "error: --steps 9: ScheduleConfig.respace must be in [1, 8]; got 9"),
    ("bad batch size", "argument --batch-size: must be a positive integer; got 0"),
    ("distributed outside torchrun", "error: --distributed: run under torchrun"),
])
def test_usage_errors_exit_2(tmp_path, model_dir, capsys, monkeypatch, case, message):
    image = _save_rgb(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    base = ["upscale", "-o", str(tmp_path / "out"), "--no-progress"]
    argv = {
        "no inputs": [*base, "--model", str(model_dir)],
        "missing model": [*base, str(image), "--model", str(tmp_path / "nowhere")],
        "missing input": [*base, str(image), str(tmp_path / "gone.png"), "--model", str(model_dir)],
        "empty folder": [*base, str(tmp_path / "empty"), "--model", str(model_dir)],
        "too many steps": [*base, str(image), "--model", str(model_dir), "--steps", "9"],
        "bad batch size": [*base, str(image), "--model", str(model_dir), "--batch-size", "0"],
        "distributed outside torchrun": [*base, str(image), "--model", str(model_dir), "--distributed"],
    }[case]
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()
    if message.startswith("error: "):
        assert stderr.count("\n") == 1 and stderr.startswith(message.format(tmp=tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, model_dir, capsys):
    image = _save_rgb(tmp_path / "a.png")
    assert _upscale(model_dir, image, "-o", tmp_path / "out", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_ranks_share_the_work_and_the_exit_code(tmp_path, model_dir):
    for index, name in enumerate(("a.png", "c.png", "d.png")):
        _save_rgb(tmp_path / "in" / name, seed=index)
    (tmp_path / "in" / "b.png").write_text("not an image")  # sorted second: rank 1's share

    def torchrun(outdir: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "sr3_engine", "upscale", str(tmp_path / "in"), "-o", str(outdir), "--model", str(model_dir),
             "--steps", "2", "--distributed", "--no-progress"],
            capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": "1"}, timeout=120,
        )

    failed = torchrun(tmp_path / "out")
    assert failed.returncode != 0
    bad = tmp_path / "in" / "b.png"
    assert _error_lines(failed.stderr) == [f"error: {bad}: not a PNG, JPEG, WebP, TIFF or BMP image"]
    assert failed.stdout.strip() == f"3 written to {tmp_path / 'out'}, 1 failed"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.png", "d.png"]

    (tmp_path / "in" / "b.png").unlink()
    succeeded = torchrun(tmp_path / "out2")
    assert succeeded.returncode == 0, succeeded.stderr
    assert succeeded.stdout.strip() == f"3 written to {tmp_path / 'out2'}, 0 failed"



def test_strength_is_a_sampler_option(tmp_path, model_dir, capsys):
    image = _save_rgb(tmp_path / "a.png")
    assert _upscale(model_dir, str(image), "-o", str(tmp_path / "out"), "--strength", "0.5") == 0
    assert (tmp_path / "out" / "a.png").is_file()
    assert _upscale(model_dir, str(image), "-o", str(tmp_path / "out2"), "--strength", "0") == 2
    assert "--strength" in capsys.readouterr().err
