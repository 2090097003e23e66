"""`python -m sr3_engine upscale`: bad inputs cost one line each, never the run; no file is lost or
clobbered; exit codes 0/1/2/130/143."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3
from sr3_engine.__main__ import main
from sr3_engine.cli.upscale import batch_seed
from sr3_engine.runtime import engine as engine_module
from sr3_engine.runtime.tiling import MemoryBudgetError

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
    assert result.stdout.splitlines()[-1] == f"4 written to {outdir}, 3 failed"


def test_all_good_exits_0(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(engine_module, "native_bf16", lambda device: False)
    _save_rgb(tmp_path / "a.png")
    _save_rgb(tmp_path / "b.png", 8, 8)
    assert _upscale(model_dir, tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    assert capsys.readouterr().out.splitlines() == [
        f"{model_dir}: eager backend on cpu, fp32 (auto: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be "
        "emulated)", f"2 written to {tmp_path / 'out'}, 0 failed"]


def test_rerun_into_an_output_folder_inside_the_input_folder(tmp_path, model_dir):
    _save_rgb(tmp_path / "a.png")
    for flags in ([], ["--skip-existing"], ["--overwrite"]):
        assert _upscale(model_dir, tmp_path, "-o", tmp_path / "out", *flags) == 0
    assert os.listdir(tmp_path / "out") == ["a.png"]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_an_output_that_would_replace_an_input_stops_the_command_before_sampling(tmp_path, model_dir, capsys,
                                                                               monkeypatch, flags):
    photo = _save_rgb(tmp_path / "good.png")
    before = photo.read_bytes()
    monkeypatch.setattr(sr3.SR3Engine, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    assert _upscale(model_dir, "good.png", "-o", ".", *flags) == 2
    assert capsys.readouterr().err == ("error: good.png: is the input good.png; writing there would replace it "
                                       "(choose another output folder)\n")
    assert photo.read_bytes() == before


def test_existing_outputs_are_refused_skipped_or_replaced(tmp_path, model_dir, capsys):
    first = _save_rgb(tmp_path / "A" / "img.png", seed=1)
    second = _save_rgb(tmp_path / "B" / "img.png", seed=2)
    other = _save_rgb(tmp_path / "B" / "other.png", seed=3)
    out = tmp_path / "out"
    assert _upscale(model_dir, first, "-o", out) == 0
    kept = (out / "img.png").read_bytes()
    capsys.readouterr()

    assert _upscale(model_dir, second, other, "-o", out) == 1
    captured = capsys.readouterr()
    assert _error_lines(captured.err) == [f"error: {second}: {out / 'img.png'} already exists "
                                          "(--overwrite replaces it, --skip-existing skips such inputs)"]
    assert captured.out.splitlines()[-1] == f"1 written to {out}, 1 failed"
    assert (out / "img.png").read_bytes() == kept and sorted(os.listdir(out)) == ["img.png", "other.png"]

    assert _upscale(model_dir, second, other, "-o", out, "--skip-existing") == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"note: {second}: skipped, {out / 'img.png'} exists",
                                         f"note: {other}: skipped, {out / 'other.png'} exists"]
    assert captured.out.splitlines()[-1] == f"0 written to {out}, 2 skipped, 0 failed"
    assert (out / "img.png").read_bytes() == kept

    assert _upscale(model_dir, second, "-o", out, "--overwrite") == 0
    assert (out / "img.png").read_bytes() != kept and sorted(os.listdir(out)) == ["img.png", "other.png"]
    assert main(["upscale", str(second), "-o", str(out), "--model", str(model_dir), "--overwrite",
                 "--skip-existing"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_two_processes_sharing_an_output_folder_write_each_name_once(tmp_path, model_dir):
    for folder, seed in (("A", 0), ("B", 10)):
        for index, name in enumerate(("p.png", "q.png", "r.png")):
            _save_rgb(tmp_path / folder / name, 8, 8, seed=seed + index)
    out = tmp_path / "out"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "sr3_engine", "upscale", str(tmp_path / folder), "-o", str(out), "--model",
         str(model_dir), "--steps", "2", "--batch-size", "1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(), "OMP_NUM_THREADS": "1"})
        for folder in ("A", "B")]
    results = [(process.wait(timeout=180), *process.communicate()) for process in processes]
    written = failed = 0
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr and code in (0, 1), stderr
        counts = stdout.splitlines()[-1].split()
        written, failed = written + int(counts[0]), failed + int(counts[-2])
        assert all("already exists" in line for line in _error_lines(stderr))
        assert len(_error_lines(stderr)) == int(counts[-2])
    assert (written, failed) == (3, 3)
    assert sorted(os.listdir(out)) == ["p.png", "q.png", "r.png"]
    for name in ("p.png", "q.png", "r.png"):
        assert Image.open(out / name).size == (16, 16)


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_while_writing_leave_no_temporary(tmp_path, model_dir, signum, code, line):
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # keeps ignoring it; a Ctrl-C at a terminal reaches a process with the default handler.
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from PIL import Image\n"
              "from sr3_engine.cli import main\n"
              "save = Image.Image.save\n"
              "def save_then_signal(self, *args, **kwargs):\n"
              "    save(self, *args, **kwargs)\n"
              f"    os.kill(os.getpid(), {int(signum)})  # the temporary is complete, not yet renamed\n"
              "    time.sleep(60)\n"
              "Image.Image.save = save_then_signal\n"
              "sys.exit(main(sys.argv[1:]))\n")
    image = _save_rgb(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-c", script, "upscale", str(image), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--steps", "2", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert (result.returncode, result.stderr, result.stdout.splitlines()[1:]) == (code, f"{line}\n", [])
    assert os.listdir(tmp_path / "out") == []


def test_stale_temporaries_in_the_output_folder_are_swept(tmp_path, model_dir):
    image = _save_rgb(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.png.0123abcd.tmp").write_bytes(b"left by a SIGKILL")
    (out / "notes.0123abcd.tmp").write_bytes(b"the user's")
    assert _upscale(model_dir, image, "-o", out) == 0
    assert sorted(os.listdir(out)) == ["a.png", "notes.0123abcd.tmp"]


def test_an_output_folder_that_cannot_be_written_stops_the_command_before_the_model_loads(
        tmp_path, model_dir, capsys, monkeypatch):
    image = _save_rgb(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        # What a read-only folder answers (root ignores permission bits, so chmod cannot make one here).
        if Path(path).parent == out and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(sr3.SR3Engine, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    assert _upscale(model_dir, image, "-o", out) == 2
    assert capsys.readouterr().err == f"error: {out}: cannot write in the output folder (Permission denied)\n"


def test_missing_looping_and_directory_inputs_cost_one_line_each(tmp_path, model_dir, capsys):
    good = _save_rgb(tmp_path / "good.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "x.png").mkdir()
    _save_rgb(tmp_path / "folder" / "inner.png", 8, 8)
    (tmp_path / "folder" / "y.jpg").mkdir()
    out = tmp_path / "out"
    assert _upscale(model_dir, good, tmp_path / "gone.png", tmp_path / "loop.png", tmp_path / "x.png",
                    tmp_path / "folder", "-o", out) == 1
    assert _error_lines(capsys.readouterr().err) == [
        f"error: {tmp_path / 'gone.png'}: no such file",
        f"error: {tmp_path / 'loop.png'}: cannot read it (Too many levels of symbolic links)",
        f"error: {tmp_path / 'x.png'}: is a directory, not an image file",
        f"error: {tmp_path / 'folder' / 'y.jpg'}: is a directory, not an image file",
    ]
    assert sorted(os.listdir(out)) == ["good.png", "inner.png"]


def test_file_names_that_are_not_utf8_work_and_print(tmp_path, model_dir, capsys):
    folder = tmp_path / "in"
    try:
        _save_rgb(folder / os.fsdecode(b"caf\xe9.png"))
        (folder / os.fsdecode(b"bad\xff.png")).write_text("not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    out = tmp_path / os.fsdecode(b"out\xe9")
    assert _upscale(model_dir, folder, "-o", out) == 1
    captured = capsys.readouterr()  # capsys, like a UTF-8 terminal, fails on a surrogate
    assert _error_lines(captured.err) == [f"error: {folder}/bad\\xff.png: not a PNG, JPEG, WebP, TIFF or BMP image"]
    assert captured.out.splitlines()[-1] == f"1 written to {tmp_path}/out\\xe9, 1 failed"
    assert os.listdir(out) == [os.fsdecode(b"caf\xe9.png")]
    # Names that are UTF-8 keep the seeds (and so the outputs) of earlier versions.
    assert batch_seed(3, "a.png") == int.from_bytes(hashlib.sha256(b"3:a.png").digest()[:8], "little") & (2**63 - 1)


def test_a_multi_page_input_gets_a_note(tmp_path, model_dir, capsys):
    path = tmp_path / "pages.tif"
    Image.new("RGB", (8, 8), (9, 99, 199)).save(path, save_all=True, append_images=[Image.new("RGB", (8, 8))] * 2)
    assert _upscale(model_dir, path, "-o", tmp_path / "out") == 0
    assert capsys.readouterr().err == (f"note: {path}: has 3 frames (a multi-page or animated image); "
                                       "only the first is used\n")
    assert os.listdir(tmp_path / "out") == ["pages.png"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(channel_mults="122"),
     "config.json: model: UNetConfig.channel_mults must be a list of integers; got '122'"),
    (lambda d: d["schedule"].update(steps=10**10),
     "config.json: schedule: ScheduleConfig.steps must be an integer in [1, 100000]; got 10000000000"),
    (lambda d: d.update(scale="four"), "config.json: scale must be an integer in [1, 32]; got 'four'"),
])
def test_a_bad_model_config_is_one_line_naming_the_file_and_the_field(tmp_path, model_dir, capsys, edit, message):
    broken = shutil.copytree(model_dir, tmp_path / "model")
    document = json.loads((broken / "config.json").read_text())
    edit(document)
    (broken / "config.json").write_text(json.dumps(document))
    assert _upscale(broken, _save_rgb(tmp_path / "a.png"), "-o", tmp_path / "out") == 2
    assert capsys.readouterr().err == f"error: {broken}/{message}\n"


def test_tiling_and_memory_flags_reach_the_engine(tmp_path, model_dir, monkeypatch):
    seen = {}
    from_pretrained, upscale = sr3.SR3Engine.from_pretrained, sr3.SR3Engine.upscale

    def load(*args, **kwargs):
        seen["max_memory"] = kwargs["max_memory"]
        return from_pretrained(*args, **kwargs)

    def sample(self, images, **kwargs):
        seen["tile"], seen["tile_overlap"] = kwargs["tile"], kwargs["tile_overlap"]
        return upscale(self, images, **kwargs)

    monkeypatch.setattr(sr3.SR3Engine, "from_pretrained", load)
    monkeypatch.setattr(sr3.SR3Engine, "upscale", sample)
    image = _save_rgb(tmp_path / "a.png")
    assert _upscale(model_dir, image, "-o", tmp_path / "auto") == 0
    assert seen == {"max_memory": None, "tile": None, "tile_overlap": None}
    assert _upscale(model_dir, image, "-o", tmp_path / "tiled", "--tile", "16", "--tile-overlap", "4",
                    "--max-memory", "1500M") == 0
    assert seen == {"max_memory": 1500 * 2**20, "tile": 16 * SCALE, "tile_overlap": 4 * SCALE}


def test_outscale_resizes_the_model_output_with_lanczos(tmp_path, model_dir):
    image = _save_rgb(tmp_path / "a.png", 12, 8)
    assert _upscale(model_dir, image, "-o", tmp_path / "model") == 0
    assert _upscale(model_dir, image, "-o", tmp_path / "x3", "--outscale", "3") == 0
    assert _upscale(model_dir, image, "-o", tmp_path / "x2", "--outscale", "2") == 0
    model = Image.open(tmp_path / "model" / "a.png")
    resized = Image.open(tmp_path / "x3" / "a.png")
    assert resized.size == (36, 24)
    assert np.array_equal(np.asarray(resized), np.asarray(model.resize((36, 24), Image.Resampling.LANCZOS)))
    assert (tmp_path / "x2" / "a.png").read_bytes() == (tmp_path / "model" / "a.png").read_bytes()


def test_a_memory_budget_error_fails_its_batch_with_a_hint(tmp_path, model_dir, capsys, monkeypatch):
    small = _save_rgb(tmp_path / "small.png", 8, 8)
    large = _save_rgb(tmp_path / "large.png", 12, 8)
    real_upscale = sr3.SR3Engine.upscale

    def upscale(self, images, **kwargs):
        if images[0].size == (12, 8):
            raise MemoryBudgetError("needs 3.1 GB in 64x64 tiles; 1.0 GB allowed")
        return real_upscale(self, images, **kwargs)

    monkeypatch.setattr(sr3.SR3Engine, "upscale", upscale)
    assert _upscale(model_dir, small, large, "-o", tmp_path / "out") == 1
    assert _error_lines(capsys.readouterr().err) == [
        f"error: {large}: needs 3.1 GB in 64x64 tiles; 1.0 GB allowed "
        "(try --tile N with a smaller N, or a larger --max-memory)"]
    assert os.listdir(tmp_path / "out") == ["small.png"]


def test_a_budget_too_small_for_any_tile_fails_with_the_hint(tmp_path, model_dir, capsys):
    image = _save_rgb(tmp_path / "photo.png", 16, 16)
    assert _upscale(model_dir, image, "-o", tmp_path / "out", "--max-memory", "1M") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {image}: ") and "MiB of working memory; the budget is 1 MiB" in line
    assert line.endswith("(try --tile N with a smaller N, or a larger --max-memory)")


def test_a_tile_overlap_the_tile_cannot_hold_is_refused_before_sampling(tmp_path, model_dir, capsys):
    image = _save_rgb(tmp_path / "photo.png", 16, 16)
    assert _upscale(model_dir, image, "-o", tmp_path / "out", "--tile", "8", "--tile-overlap", "4") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tile 8 --tile-overlap 4: tile overlap 8 must be at least 0 and under half the "
                          "tile (16)") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


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
    ("only input missing", "error: {tmp}/gone.png: no such file"),
    ("no input is a file", "error: {tmp}/gone.png: no such file (and 1 more input(s) that are not files)"),
    ("empty folder", "error: no images found in {tmp}/empty"),
    ("too many steps", "error: --steps 9: ScheduleConfig.respace must be in [1, 8]; got 9"),
    ("bad batch size", "argument --batch-size: must be a positive integer; got 0"),
    ("bad memory size", "argument --max-memory: expected bytes or a size such as 2G, 1500M, 512K; got '2X'"),
    ("bad outscale", "argument --outscale: must be a number > 0; got 0"),
    ("negative tile", "argument --tile: must be a non-negative integer; got -1"),
    ("distributed outside torchrun", "error: --distributed: run under torchrun"),
])
def test_usage_errors_exit_2(tmp_path, model_dir, capsys, monkeypatch, case, message):
    image = _save_rgb(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").mkdir()
    base = ["upscale", "-o", str(tmp_path / "out"), "--no-progress"]
    argv = {
        "no inputs": [*base, "--model", str(model_dir)],
        "missing model": [*base, str(image), "--model", str(tmp_path / "nowhere")],
        "only input missing": [*base, str(tmp_path / "gone.png"), "--model", str(model_dir)],
        "no input is a file": [*base, str(tmp_path / "gone.png"), str(tmp_path / "empty"), str(tmp_path / "x.png"),
                               "--model", str(model_dir)],
        "empty folder": [*base, str(tmp_path / "empty"), "--model", str(model_dir)],
        "too many steps": [*base, str(image), "--model", str(model_dir), "--steps", "9"],
        "bad batch size": [*base, str(image), "--model", str(model_dir), "--batch-size", "0"],
        "bad memory size": [*base, str(image), "--model", str(model_dir), "--max-memory", "2X"],
        "bad outscale": [*base, str(image), "--model", str(model_dir), "--outscale", "0"],
        "negative tile": [*base, str(image), "--model", str(model_dir), "--tile", "-1"],
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
    assert failed.stdout.splitlines()[-1] == f"3 written to {tmp_path / 'out'}, 1 failed"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.png", "d.png"]

    (tmp_path / "in" / "b.png").unlink()
    succeeded = torchrun(tmp_path / "out2")
    assert succeeded.returncode == 0, succeeded.stderr
    assert succeeded.stdout.splitlines()[-1] == f"3 written to {tmp_path / 'out2'}, 0 failed"



def test_strength_is_a_sampler_option(tmp_path, model_dir, capsys):
    image = _save_rgb(tmp_path / "a.png")
    assert _upscale(model_dir, str(image), "-o", str(tmp_path / "out"), "--strength", "0.5") == 0
    assert (tmp_path / "out" / "a.png").is_file()
    assert _upscale(model_dir, str(image), "-o", str(tmp_path / "out2"), "--strength", "0") == 2
    assert "--strength" in capsys.readouterr().err
